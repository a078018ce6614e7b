"""The two-stage trainer (README, "Retrain the weights"), and the paper's comparison methods.

Stage 1: the perceptual DRL learns LDCT -> NDCT with MSE + 0.1 x VGG16 perceptual loss.
Stage 2: the difference DRL learns, with MSE, to predict ``Y_hat - Y`` from ``Y_hat``
(the stage-1 output), so inference computes ``final = Y_hat - diff_pred``.

``TrainOptions.method`` trains the other pipelines of the paper's figure 2 the same way
(:data:`METHODS`: A, B, D and the CNN10 variants); MANIFEST.json records the pipeline,
which :class:`ldct_node.model.cascade.Cascade` runs.

Everything lands in the output folder::

    OUT/drl_perceptual.weights.h5, OUT/drl_difference.weights.h5, OUT/MANIFEST.json
    OUT/checkpoints/        per-epoch weights + state.json (what ``--resume`` reads)
    OUT/logs/stage1.csv, OUT/logs/stage2.csv (+ TensorBoard event files when available)
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import logging
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ldct_node import __version__
from ldct_node.choices import LrSchedule, Method
from ldct_node.fsutil import replace_durably, write_text_atomic
from ldct_node.lab.data import (
    PatchSet,
    extract_patches,
    find_cases,
    load_case,
    split_cases,
)
from ldct_node.lab.metrics import rmse
from ldct_node.model.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    read_raw,
    sha256_file,
    write_raw,
)
from ldct_node.model.scaling import HU_MIN, HU_RANGE, model_to_hu

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"


@dataclass(frozen=True)
class StageSpec:
    """One network of a method's pipeline and how it is trained."""

    #: Name of the network in MANIFEST.json (``networks`` and ``pipeline``).
    role: str
    #: Architecture (a key of ``NETWORK_BUILDERS``).
    builder: str
    #: ``"image"``: the network outputs the image; ``"difference"``: it predicts its
    #: input minus the NDCT, which is subtracted.
    output: str
    #: ``"perceptual"`` (MSE + weight x VGG16 perceptual) or ``"mse"``.
    loss: str
    file: str


_PERCEPTUAL = StageSpec(
    "perceptual", "drl_perceptual", "image", "perceptual", "drl_perceptual.weights.h5"
)
_DIFFERENCE = StageSpec(
    "difference", "drl_difference", "difference", "mse", "drl_difference.weights.h5"
)

#: The methods of the paper's comparison (its figure 2), by name. Stage k is trained on
#: the output of stages 1..k-1. ``perceptual`` stages train for ``epochs_perceptual``
#: epochs, MSE stages for ``epochs_difference``.
METHODS: dict[str, tuple[StageSpec, ...]] = {
    Method.C: (_PERCEPTUAL, _DIFFERENCE),
    Method.A: (_DIFFERENCE,),
    Method.B: (_PERCEPTUAL,),
    Method.D: (
        StageSpec("level1", "drl_difference", "difference", "mse", "drl_level1.weights.h5"),
        StageSpec("level2", "drl_difference", "difference", "mse", "drl_level2.weights.h5"),
    ),
    Method.C_CNN10: (
        _PERCEPTUAL,
        StageSpec("difference", "cnn10", "difference", "mse", "cnn10_difference.weights.h5"),
    ),
    Method.D_CNN10: (
        StageSpec("level1", "cnn10", "difference", "mse", "cnn10_level1.weights.h5"),
        StageSpec("level2", "cnn10", "difference", "mse", "cnn10_level2.weights.h5"),
    ),
}
METHOD_DESCRIPTIONS: dict[str, str] = {
    Method.C: "cascade: perceptual DRL, then MSE difference DRL (the paper's method)",
    Method.A: "single MSE difference DRL",
    Method.B: "perceptual DRL alone",
    Method.D: "two-level MSE difference cascade of DRLs (Wu et al.)",
    Method.C_CNN10: "cascade with CNN10 as the difference predictor",
    Method.D_CNN10: "two-level MSE difference cascade of CNN10s (Wu et al.'s networks)",
}


LR_SCHEDULES = tuple(s.value for s in LrSchedule)
"""Learning-rate schedules of :attr:`TrainOptions.lr_schedule`."""

COSINE_FINAL_FRACTION = 0.01
"""Where the cosine schedule ends, as a fraction of the initial learning rate."""


@dataclass
class TrainOptions:
    """The training recipe; defaults are the paper's."""

    data_dir: Path
    output_dir: Path
    epochs_perceptual: int = 15
    epochs_difference: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    perceptual_weight: float = 0.1
    #: "none": the literal perceptual distance; "calibrated": divided by its ratio to the
    #: MSE on the training pairs (losses.calibrate_perceptual_scale).
    perceptual_norm: str = "none"
    vgg_weights: str = "imagenet"
    patch_size: int = 64
    stride: int = 32
    max_air_fraction: float = 0.5
    val_fraction: float = 0.1
    max_patches: int | None = None
    seed: int = 0
    resume: bool = False
    #: Which pipeline to train (a key of METHODS); "C" is the paper's cascade.
    method: str = "C"
    #: Weights folder of an earlier run whose leading stages this method shares
    #: (same data and recipe): they are loaded instead of trained again.
    reuse_from: Path | None = None
    #: Weights folder whose networks (same role and architecture) start this run's
    #: networks instead of a random initialisation: fine-tuning, e.g. the bundled
    #: weights on a site's own data. With 0 epochs a stage keeps them unchanged.
    init_from: Path | None = None
    #: "constant" (the paper's Adam at ``learning_rate``) or "cosine" (decays from
    #: ``learning_rate`` to 1 % of it over each stage's epochs).
    lr_schedule: str = "constant"
    distributed: bool = False
    verbose: int = 1
    extra_provenance: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        for name in ("epochs_perceptual", "epochs_difference"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not self.learning_rate > 0:
            raise ValueError("learning_rate must be > 0")
        if self.max_patches is not None and self.max_patches < 1:
            raise ValueError("max_patches must be >= 1")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        from ldct_node.lab.losses import PERCEPTUAL_NORMS

        if self.perceptual_norm not in PERCEPTUAL_NORMS:
            raise ValueError(
                f"perceptual_norm must be one of {', '.join(PERCEPTUAL_NORMS)}, "
                f"not {self.perceptual_norm!r}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, not {self.lr_schedule!r}"
            )


def _save_weights_atomic(model: Any, path: Path) -> None:
    tmp = path.with_name(path.stem.removesuffix(".weights") + ".tmp.weights.h5")
    model.save_weights(str(tmp))
    replace_durably(tmp, path)


def load_patches(opts: TrainOptions) -> PatchSet:
    """Load every case, split by case into train/validation, cut patches."""
    rng = np.random.default_rng(opts.seed)
    cases = find_cases(opts.data_dir)
    train_ids, val_ids = split_cases([c.case_id for c in cases], opts.val_fraction, rng)
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "val": []}
    for case in cases:
        pair = load_case(case)
        low, full = extract_patches(
            pair.ldct,
            pair.ndct,
            patch_size=opts.patch_size,
            stride=opts.stride,
            max_air_fraction=opts.max_air_fraction,
        )
        parts["val" if case.case_id in val_ids else "train"].append((low, full))

    def stack(items: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        if not items:
            empty = np.zeros((0, opts.patch_size, opts.patch_size, 1), np.float32)
            return empty, empty.copy()
        return np.concatenate([i[0] for i in items]), np.concatenate([i[1] for i in items])

    train_low, train_full = stack(parts["train"])
    val_low, val_full = stack(parts["val"])
    if len(train_low) == 0:
        raise ValueError(f"{opts.data_dir}: no training patches (all air, or images too small?)")
    order = rng.permutation(len(train_low))
    if opts.max_patches is not None:
        order = order[: opts.max_patches]
    return PatchSet(
        train_ldct=train_low[order],
        train_ndct=train_full[order],
        val_ldct=val_low,
        val_ndct=val_full,
        train_cases=train_ids,
        val_cases=val_ids,
    )


def _checkpoint_callback(stage: int, ckpt_dir: Path) -> Any:
    """A Keras callback writing per-epoch weights + state.json atomically."""
    import keras

    class Checkpoint(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            _save_weights_atomic(self.model, ckpt_dir / f"stage{stage}.weights.h5")
            write_text_atomic(
                ckpt_dir / STATE_FILE, json.dumps({"stage": stage, "epochs_done": epoch + 1})
            )

    return Checkpoint()


def export_weights(net: Any, builder: str, path: Path) -> None:
    """Write only the network's own weights, from a fresh uncompiled copy.

    ``save_weights`` on the compiled training model would also store the optimizer
    state and whatever the loss tracks: the perceptual loss holds the VGG16 extractor,
    whose ImageNet weights must not travel with ours.
    """
    from ldct_node.model.networks import NETWORK_BUILDERS

    fresh = NETWORK_BUILDERS[builder]()
    fresh.set_weights(net.get_weights())
    _save_weights_atomic(fresh, path)


def _load_checkpoint(model: Any, path: Path) -> None:
    """Weights and Adam moments: build the optimizer first so its state is restored too."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint missing; cannot --resume")
    model.optimizer.build(model.trainable_variables)
    model.load_weights(str(path))


def _read_state(ckpt_dir: Path) -> dict[str, int]:
    path = ckpt_dir / STATE_FILE
    if not path.is_file():
        return {"stage": 1, "epochs_done": 0}
    state = json.loads(path.read_text(encoding="utf-8"))
    return {"stage": int(state["stage"]), "epochs_done": int(state["epochs_done"])}


def _fit_stage(
    stage: int,
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    val: tuple[np.ndarray, np.ndarray] | None,
    *,
    epochs: int,
    initial_epoch: int,
    opts: TrainOptions,
) -> list[dict[str, float]]:
    import keras

    ckpt_dir = opts.output_dir / "checkpoints"
    log_dir = opts.output_dir / "logs"
    callbacks: list[Any] = [
        keras.callbacks.CSVLogger(str(log_dir / f"stage{stage}.csv"), append=initial_epoch > 0),
        _checkpoint_callback(stage, ckpt_dir),
    ]
    if keras.backend.backend() == "tensorflow" and importlib.util.find_spec("tensorboard"):
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(log_dir / f"tb_stage{stage}")))
    if initial_epoch >= epochs:
        logger.info("stage %d: %d/%d epochs already done", stage, initial_epoch, epochs)
        return []
    if opts.distributed:
        history = _fit_distributed(model, x, y, val, callbacks, epochs, initial_epoch, opts)
    else:
        history = model.fit(
            x,
            y,
            batch_size=opts.batch_size,
            epochs=epochs,
            initial_epoch=initial_epoch,
            validation_data=val if val is not None and len(val[0]) else None,
            callbacks=callbacks,
            shuffle=True,
            verbose=opts.verbose,
        )
    n = len(next(iter(history.history.values()), []))
    return [{k: float(v[i]) for k, v in history.history.items()} for i in range(n)]


def _fit_distributed(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    val: tuple[np.ndarray, np.ndarray] | None,
    callbacks: list[Any],
    epochs: int,
    initial_epoch: int,
    opts: TrainOptions,
) -> Any:
    """``fit`` on whole global batches only: a last partial batch would leave some
    replicas an empty slice, which TensorFlow's convolutions reject. The patches are
    reshuffled every epoch, so each epoch leaves out different ones."""
    import tensorflow as tf

    batch = opts.batch_size
    if len(x) < batch:
        raise ValueError(f"batch_size: {batch} is more than the {len(x)} training patches")
    train_ds = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=opts.seed, reshuffle_each_iteration=True)
        .batch(batch, drop_remainder=True)
    )
    val_ds = None
    if val is not None and len(val[0]) >= batch:
        val_ds = tf.data.Dataset.from_tensor_slices(val).batch(batch, drop_remainder=True)
    elif val is not None and len(val[0]):
        logger.warning("fewer validation patches than one global batch: no validation loss")
    return model.fit(
        train_ds,
        epochs=epochs,
        initial_epoch=initial_epoch,
        validation_data=val_ds,
        callbacks=callbacks,
        verbose=opts.verbose,
    )


def _predict(model: Any, x: np.ndarray, batch_size: int, whole_batches: bool = False) -> np.ndarray:
    """``model.predict``; with ``whole_batches`` the input is padded to whole batches
    (distributed: no replica may get an empty slice) and the padding dropped again."""
    n = len(x)
    if whole_batches and n % batch_size:
        pad = np.repeat(x[-1:], batch_size - n % batch_size, axis=0)
        x = np.concatenate([x, pad])
    out = np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float32)
    return out[:n]


def patch_metrics(ldct: np.ndarray, ndct: np.ndarray, denoised: np.ndarray) -> dict[str, float]:
    """RMSE vs NDCT and std of the difference to NDCT, in HU, before and after."""

    def diff_std(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.std(model_to_hu(a) - model_to_hu(b)))

    def rmse_hu(a: np.ndarray, b: np.ndarray) -> float:
        return rmse(model_to_hu(a), model_to_hu(b))

    return {
        "rmse_hu_ldct_vs_ndct": rmse_hu(ldct, ndct),
        "rmse_hu_denoised_vs_ndct": rmse_hu(denoised, ndct),
        "std_hu_ldct_minus_ndct": diff_std(ldct, ndct),
        "std_hu_denoised_minus_ndct": diff_std(denoised, ndct),
    }


#: Training patch pairs the perceptual scale is calibrated on (a fixed, seeded sample).
CALIBRATION_PATCHES = 512


def _stage_loss(
    spec: StageSpec, opts: TrainOptions, vgg_extractor: Any | None, patches: PatchSet
) -> tuple[Any, float | None]:
    """The loss of one stage (MSE, or MSE + weight x VGG16 perceptual distance) and,
    with ``perceptual_norm = "calibrated"``, the perceptual scale it divides by."""
    if spec.loss == "mse":
        return "mse", None
    from ldct_node.lab.losses import (
        calibrate_perceptual_scale,
        load_vgg_extractor,
        make_perceptual_mse_loss,
    )

    extractor = vgg_extractor if vgg_extractor is not None else load_vgg_extractor(opts.vgg_weights)
    scale: float | None = None
    if opts.perceptual_norm == "calibrated":
        rng = np.random.default_rng(opts.seed)
        n = len(patches.train_ldct)
        pick = np.sort(rng.choice(n, size=min(n, CALIBRATION_PATCHES), replace=False))
        scale = calibrate_perceptual_scale(
            extractor, patches.train_ldct[pick], patches.train_ndct[pick], opts.batch_size
        )
        logger.info("perceptual term calibrated: %.4g perceptual per unit MSE", scale)
    return make_perceptual_mse_loss(extractor, opts.perceptual_weight, scale or 1.0), scale


def _stage_done(state: dict[str, int], stage: int, epochs: int) -> bool:
    """Whether the checkpoint state says ``stage`` has trained all its ``epochs``."""
    return state["stage"] > stage or (state["stage"] == stage and state["epochs_done"] >= epochs)


def _stage_epochs(spec: StageSpec, opts: TrainOptions) -> int:
    return opts.epochs_perceptual if spec.loss == "perceptual" else opts.epochs_difference


def _apply_stage(
    spec: StageSpec, net: Any, x: np.ndarray, batch_size: int, whole_batches: bool = False
) -> np.ndarray:
    """The pipeline's image after this stage: the network's image, or input - difference."""
    pred = _predict(net, x, batch_size, whole_batches)
    return pred if spec.output == "image" else x - pred


#: Options that do not change what a stage learns (compared by ``--reuse-from``).
_NOT_RECIPE = ("method", "reuse_from", "distributed")
#: Recipe keys newer than some manifests, with the value older runs implicitly used.
_RECIPE_DEFAULTS: dict[str, Any] = {
    "init_from": None,
    "lr_schedule": "constant",
    "perceptual_norm": "none",
}


def _reusable_stages(opts: TrainOptions, stages: tuple[StageSpec, ...]) -> list[Path]:
    """Weights files of ``opts.reuse_from`` for the leading stages it shares with ``stages``.

    A stage is shared when it has the same builder, output and loss, and was trained on
    the same data with the same recipe (patches, epochs, learning rate, seed), so the
    network is exactly the one this run would train.
    """
    if opts.reuse_from is None:
        return []
    path = opts.reuse_from / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: --reuse-from needs a trained weights folder")
    other = read_raw(opts.reuse_from)
    mine = {k: v for k, v in _recipe(opts).items() if k not in _NOT_RECIPE}
    theirs = {
        k: v
        for k, v in {**_RECIPE_DEFAULTS, **other.get("recipe", {})}.items()
        if k not in _NOT_RECIPE
    }
    if mine != theirs:
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise ValueError(
            f"--reuse-from: {opts.reuse_from} was trained with another recipe ({diff})"
        )
    files: list[Path] = []
    for spec, entry in zip(stages, other.get("pipeline", []), strict=False):
        net = other["networks"][entry["network"]]
        if (net["builder"], entry["output"], entry.get("loss")) != (
            spec.builder,
            spec.output,
            spec.loss,
        ):
            break
        file = opts.reuse_from / net["file"]
        if sha256_file(file) != net["sha256"]:
            raise ValueError(f"--reuse-from: {file} does not match its manifest's sha256")
        files.append(file)
    if not files:
        raise ValueError(
            f"--reuse-from: {opts.reuse_from} ({other.get('method', 'C')}) shares no leading "
            f"stage with method {opts.method}"
        )
    return files


def _initial_weights(opts: TrainOptions, stages: tuple[StageSpec, ...]) -> dict[int, Path]:
    """Weights files of ``opts.init_from`` to start stages from, by stage number.

    A stage starts from the network of ``opts.init_from`` with the same role (its name in
    MANIFEST.json) and architecture; stages without one start from scratch.
    """
    if opts.init_from is None:
        return {}
    path = opts.init_from / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: --init-from needs a trained weights folder")
    other = read_raw(opts.init_from)
    found: dict[int, Path] = {}
    for k, spec in enumerate(stages, start=1):
        net = other.get("networks", {}).get(spec.role)
        if net is None or net.get("builder") != spec.builder:
            logger.info("stage %d (%s): nothing to start from in --init-from", k, spec.role)
            continue
        file = opts.init_from / net["file"]
        if not file.is_file() or sha256_file(file) != net["sha256"]:
            raise ValueError(f"--init-from: {file} is missing or does not match its sha256")
        found[k] = file
    if not found:
        raise ValueError(
            f"--init-from: {opts.init_from} has no network with the role and architecture "
            f"of a stage of method {opts.method}"
        )
    return found


def _optimizer(opts: TrainOptions, n_train: int, epochs: int) -> Any:
    """Adam at ``opts.learning_rate``, constant or cosine-decayed over the stage."""
    import keras

    if opts.lr_schedule == "constant" or epochs == 0:
        return keras.optimizers.Adam(opts.learning_rate)
    steps = max(1, epochs * -(-n_train // opts.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(
        opts.learning_rate, decay_steps=steps, alpha=COSINE_FINAL_FRACTION
    )
    return keras.optimizers.Adam(schedule)


def distribution_strategy() -> Any:
    """A ``tf.distribute.MirroredStrategy`` over every GPU, else every (logical) CPU.

    One replica per device, gradients all-reduced after each batch. Without GPUs it
    mirrors over the CPU devices TensorFlow has (one, unless split with
    ``tf.config.set_logical_device_configuration``, which the tests do).
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            f"--distributed needs the TensorFlow backend (KERAS_BACKEND is "
            f"{keras.backend.backend()!r})"
        )
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    # NCCL (the default all-reduce) needs GPUs; on CPUs reduce through one device.
    cross = None if gpus else tf.distribute.ReductionToOneDevice()
    strategy = tf.distribute.MirroredStrategy(devices=devices, cross_device_ops=cross)
    logger.info(
        "distributed training: MirroredStrategy with %d replica(s) on %s",
        strategy.num_replicas_in_sync,
        ", ".join(devices),
    )
    return strategy


def train(opts: TrainOptions, *, vgg_extractor: Any | None = None) -> dict[str, Any]:
    """Train every stage of ``opts.method`` and write weights + MANIFEST.json.

    Stage k learns from the pipeline's output after stage k - 1 (the LDCT for k = 1):
    an ``image`` stage learns the NDCT, a ``difference`` stage learns its input minus
    the NDCT (inference subtracts what it predicts).

    With ``opts.distributed`` the networks (and the VGG16 loss network) are built and
    trained under :func:`distribution_strategy`; ``opts.batch_size`` is the global
    batch.
    """
    if not opts.distributed:
        return _train_stages(opts, vgg_extractor=vgg_extractor)
    opts.validate()
    strategy = distribution_strategy()
    if opts.batch_size < strategy.num_replicas_in_sync:
        raise ValueError(
            f"batch_size: {opts.batch_size} is smaller than the "
            f"{strategy.num_replicas_in_sync} replicas"
        )
    with strategy.scope():
        return _train_stages(opts, vgg_extractor=vgg_extractor)


def _train_stages(opts: TrainOptions, *, vgg_extractor: Any | None = None) -> dict[str, Any]:
    """Train every stage of ``opts.method`` and write weights + MANIFEST.json into
    ``opts.output_dir`` (under the caller's distribution strategy, if any).

    Parameters
    ----------
    opts
        The recipe and folders.
    vgg_extractor
        A feature extractor to use instead of loading ``opts.vgg_weights`` (tests pass
        a small random one).

    Returns
    -------
    dict
        The manifest written.
    """
    import keras

    from ldct_node.model.networks import NETWORK_BUILDERS

    opts.validate()
    stages = METHODS[opts.method]
    n_stages = len(stages)
    out = opts.output_dir
    ckpt_dir = out / "checkpoints"
    for d in (out, ckpt_dir, out / "logs"):
        d.mkdir(parents=True, exist_ok=True)
    state = _read_state(ckpt_dir) if opts.resume else {"stage": 1, "epochs_done": 0}
    if not opts.resume and (ckpt_dir / STATE_FILE).exists():
        raise FileExistsError(
            f"{out} holds a previous run's checkpoints: pass --resume to continue it, "
            "or choose another --output"
        )
    if state["stage"] > n_stages:  # a finished run: continue the last stage if asked to
        state = {"stage": n_stages, "epochs_done": state["epochs_done"]}
    reused = _reusable_stages(opts, stages)
    initial = _initial_weights(opts, stages)
    keras.utils.set_random_seed(opts.seed)

    patches = load_patches(opts)
    logger.info(
        "method %s: %d train patches (%d cases), %d validation (%d cases)",
        opts.method,
        len(patches.train_ldct),
        len(patches.train_cases),
        len(patches.val_ldct),
        len(patches.val_cases),
    )
    has_val = len(patches.val_ldct) > 0
    x_train = patches.train_ldct
    x_val = patches.val_ldct if has_val else None
    history: dict[str, list[dict[str, float]]] = {}
    stage_rmse: dict[str, float] = {}
    perceptual_scales: dict[str, float] = {}
    nets: list[Any] = []
    for k, spec in enumerate(stages, start=1):
        net = NETWORK_BUILDERS[spec.builder]()

        def target(x: np.ndarray, ndct: np.ndarray, spec: StageSpec = spec) -> np.ndarray:
            return ndct if spec.output == "image" else x - ndct

        if k <= len(reused):
            # Not compiled: a reused network is only run, never trained here.
            net.load_weights(str(reused[k - 1]))
            logger.info("stage %d: reusing %s", k, reused[k - 1])
        else:
            if k in initial:
                net.load_weights(str(initial[k]))
                logger.info("stage %d: starting from %s", k, initial[k])
            loss, scale = _stage_loss(spec, opts, vgg_extractor, patches)
            if scale is not None:
                perceptual_scales[f"stage{k}"] = scale
            net.compile(
                optimizer=_optimizer(opts, len(x_train), _stage_epochs(spec, opts)),
                loss=loss,
                metrics=["mse"] if spec.loss == "perceptual" else None,
            )
            if opts.resume and (
                state["stage"] > k or (state["stage"] == k and state["epochs_done"])
            ):
                _load_checkpoint(net, ckpt_dir / f"stage{k}.weights.h5")
            if state["stage"] <= k:
                history[f"stage{k}"] = _fit_stage(
                    k,
                    net,
                    x_train,
                    target(x_train, patches.train_ndct),
                    (x_val, target(x_val, patches.val_ndct)) if x_val is not None else None,
                    epochs=_stage_epochs(spec, opts),
                    initial_epoch=state["epochs_done"] if state["stage"] == k else 0,
                    opts=opts,
                )
                if k < n_stages:
                    _save_weights_atomic(net, ckpt_dir / f"stage{k}.weights.h5")
                    write_text_atomic(
                        ckpt_dir / STATE_FILE, json.dumps({"stage": k + 1, "epochs_done": 0})
                    )
                    state = {"stage": k + 1, "epochs_done": 0}
        nets.append(net)
        # A later stage that still trains learns from this stage's output; otherwise only
        # the metrics need it, from the validation patches when there are any (a resumed
        # run whose last stage is already done predicts no training patches).
        later_trains = any(
            j > len(reused) and not _stage_done(state, j, _stage_epochs(stages[j - 1], opts))
            for j in range(k + 1, n_stages + 1)
        )
        if later_trains or x_val is None:
            x_train = _apply_stage(spec, net, x_train, opts.batch_size, opts.distributed)
        if x_val is not None:
            x_val = _apply_stage(spec, net, x_val, opts.batch_size, opts.distributed)
            if k < n_stages:
                stage_rmse[f"rmse_hu_stage{k}_vs_ndct"] = rmse(
                    model_to_hu(x_val), model_to_hu(patches.val_ndct)
                )

    for spec, net in zip(stages, nets, strict=True):
        export_weights(net, spec.builder, out / spec.file)

    # Validation patches when there are any, else the training patches.
    if x_val is not None:
        split, eval_low, eval_full, final = "validation", patches.val_ldct, patches.val_ndct, x_val
    else:
        split, eval_low, eval_full, final = (
            "training",
            patches.train_ldct,
            patches.train_ndct,
            x_train,
        )
    metrics: dict[str, Any] = {
        f"patches_{split}": {
            **patch_metrics(eval_low, eval_full, final),
            **stage_rmse,
            "n_patches": len(eval_low),
        }
    }
    extra: dict[str, Any] = {"reused_stages": [str(p) for p in reused]} if reused else {}
    if perceptual_scales:
        extra["perceptual_scale"] = perceptual_scales
    if initial and opts.init_from is not None:
        source = json.loads((opts.init_from / MANIFEST_NAME).read_text(encoding="utf-8"))
        extra["initialised_from"] = {
            "model_version": source.get("model_version"),
            "stages": {str(k): str(p) for k, p in initial.items()},
        }
    manifest = write_manifest(opts, patches, metrics, history, extra_data=extra)
    last_epochs = _stage_epochs(stages[-1], opts)
    write_text_atomic(
        ckpt_dir / STATE_FILE,
        json.dumps({"stage": n_stages + 1, "epochs_done": max(last_epochs, state["epochs_done"])}),
    )
    return manifest


def _recipe(opts: TrainOptions) -> dict[str, Any]:
    return {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in asdict(opts).items()
        if k not in ("output_dir", "verbose", "resume", "extra_provenance")
    }


def write_manifest(
    opts: TrainOptions,
    patches: PatchSet,
    metrics: dict[str, Any],
    history: dict[str, list[dict[str, float]]],
    *,
    extra_data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """MANIFEST.json: what inference loads (networks, pipeline, sha256) and the provenance."""
    import keras

    from ldct_node.model.networks import NETWORK_BUILDERS

    out = opts.output_dir
    stages = METHODS[opts.method]
    digests = [sha256_file(out / spec.file) for spec in stages]
    stamp = dt.datetime.now(dt.UTC)
    prefix = "drlc" if opts.method == "C" else f"ldct{opts.method.lower().replace('-', '')}"
    version = f"{prefix}-{stamp:%Y%m%d}-{''.join(d[:6] for d in digests)}"
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "model_version": version,
        "created": stamp.isoformat(timespec="seconds"),
        "method": opts.method,
        "method_description": METHOD_DESCRIPTIONS[opts.method],
        "networks": {
            spec.role: {
                "builder": spec.builder,
                "file": spec.file,
                "sha256": digest,
                "parameters": int(NETWORK_BUILDERS[spec.builder]().count_params()),
            }
            for spec, digest in zip(stages, digests, strict=True)
        },
        # What inference runs, in order (ldct_node.model.cascade reads this).
        "pipeline": [
            {"network": spec.role, "output": spec.output, "loss": spec.loss} for spec in stages
        ],
        "inference": {
            "final": pipeline_formula(stages),
            "model_range": {"hu_min": HU_MIN, "hu_range": HU_RANGE},
        },
        "recipe": _recipe(opts),
        "data": {
            "train_cases": patches.train_cases,
            "validation_cases": patches.val_cases,
            "n_train_patches": len(patches.train_ldct),
            "n_validation_patches": len(patches.val_ldct),
            "simulation": simulation_provenance(opts.data_dir),
            **opts.extra_provenance,
            **(extra_data or {}),
        },
        "metrics": metrics,
        "history": history,
        "software": {
            "ldct_node": __version__,
            "keras": keras.__version__,
            "backend": keras.backend.backend(),
            "python": platform.python_version(),
        },
    }
    write_raw(out, manifest)
    logger.info("wrote %s (model version %s)", out / MANIFEST_NAME, version)
    return manifest


#: Per-case keys of simulation.json left out of the manifest (per-slice object lists
#: and file names: large, and the case ids already say which cases were used).
_BULKY_CASE_KEYS = ("slices", "files")


def simulation_provenance(data_dir: Path) -> dict[str, Any] | None:
    """The ``simulate`` parameters behind the training data, for MANIFEST.json.

    ``data_dir/simulation.json`` when there is one; else every ``simulation.json``
    below it by relative folder (``{"body": ..., "qa": ...}``); None for data that
    was not simulated. Per-slice details are dropped from each case.
    """

    def slim(path: Path) -> dict[str, Any]:
        record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        record["cases"] = [
            {k: v for k, v in case.items() if k not in _BULKY_CASE_KEYS}
            for case in record.get("cases", [])
        ]
        return record

    root = data_dir / "simulation.json"
    if root.is_file():
        return slim(root)
    found = sorted(data_dir.rglob("simulation.json"))
    if not found:
        return None
    return {p.parent.relative_to(data_dir).as_posix(): slim(p) for p in found}


def pipeline_formula(stages: tuple[StageSpec, ...]) -> str:
    """What a pipeline computes, e.g. ``Y_hat - diff_pred`` (the cascade) or, for D,
    ``y1 = x - level1(x); final = y1 - level2(y1)``."""
    if stages == METHODS["C"]:
        return "Y_hat - diff_pred"
    steps: list[str] = []
    prev = "x"
    for k, spec in enumerate(stages, start=1):
        name = "final" if k == len(stages) else f"y{k}"
        rhs = f"{spec.role}({prev})" if spec.output == "image" else f"{prev} - {spec.role}({prev})"
        steps.append(f"{name} = {rhs}")
        prev = name
    return "; ".join(steps)
