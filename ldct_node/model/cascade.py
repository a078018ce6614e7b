"""Inference with the two-network cascade.

``final = Y_hat - diff_pred`` where ``Y_hat = net1(x)`` (the perceptual DRL) and
``diff_pred = net2(Y_hat)`` (the difference DRL), optionally blended with the input:
``(1 - blend) * final + blend * input``.

The networks work in a fixed "model range": HU -1024..3072 maps linearly to 0..1.
Pixels outside that range (padding outside the field of view, dense metal) are not
seen correctly by the networks, so they keep their input values.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

HU_MIN = -1024.0
HU_RANGE = 4096.0
MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = 1
NETWORK_ROLES = ("perceptual", "difference")
#: What a pipeline stage outputs: the image, or a difference map subtracted from its input.
STAGE_OUTPUTS = ("image", "difference")
#: The paper's cascade; the pipeline of a manifest that names none.
DEFAULT_PIPELINE: tuple[tuple[str, str], ...] = (
    ("perceptual", "image"),
    ("difference", "difference"),
)
#: ``engine`` values of :class:`Cascade`: "fused" (:mod:`ldct_node.model.fused`, the
#: default where the networks are DRLs) or "keras" (the Keras models as built).
ENGINES = ("auto", "fused", "keras")
PRECISION_POLICIES = {
    "float32": "float32",
    # Variables stay float32 (the stored weights), compute runs in the low precision.
    "bfloat16": "mixed_bfloat16",
    "mixed_float16": "mixed_float16",
}


class WeightsError(RuntimeError):
    """Weights that cannot be used: missing, corrupt or not matching their manifest."""


def hu_to_model(hu: np.ndarray) -> np.ndarray:
    """HU -> model range (float32), clipped to the range the networks were trained on."""
    clipped = np.clip(np.asarray(hu, dtype=np.float32), HU_MIN, HU_MIN + HU_RANGE)
    return (clipped - HU_MIN) / np.float32(HU_RANGE)


def model_to_hu(values: np.ndarray) -> np.ndarray:
    """Model range -> HU (float32); inverse of :func:`hu_to_model` inside the range."""
    return np.asarray(values, dtype=np.float32) * np.float32(HU_RANGE) + np.float32(HU_MIN)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class NetworkEntry:
    role: str
    builder: str
    file: str
    sha256: str
    parameters: int


@dataclass(frozen=True)
class Manifest:
    """The parts of weights/MANIFEST.json that inference relies on; the rest is provenance.

    ``pipeline`` lists (network role, output) in order; manifests without one (every
    weights folder before the comparison methods) are the cascade, DEFAULT_PIPELINE.
    """

    model_version: str
    networks: dict[str, NetworkEntry]
    raw: dict[str, Any] = field(default_factory=dict, compare=False)
    pipeline: tuple[tuple[str, str], ...] = DEFAULT_PIPELINE
    method: str = "C"

    @classmethod
    def read(cls, weights_dir: Path) -> Manifest:
        path = weights_dir / MANIFEST_NAME
        if not path.is_file():
            raise WeightsError(f"{path}: no {MANIFEST_NAME} (is weights_dir right?)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if raw.get("format") != MANIFEST_FORMAT:
                raise WeightsError(
                    f"{path}: manifest format {raw.get('format')!r}, expected {MANIFEST_FORMAT}"
                )
            if "pipeline" in raw:
                pipeline = tuple((str(s["network"]), str(s["output"])) for s in raw["pipeline"])
            else:
                pipeline = DEFAULT_PIPELINE
            if not pipeline:
                raise ValueError("empty pipeline")
            for role, output in pipeline:
                if output not in STAGE_OUTPUTS:
                    raise ValueError(f"stage {role!r}: output {output!r} not in {STAGE_OUTPUTS}")
            networks = {
                role: NetworkEntry(
                    role=role,
                    builder=str(raw["networks"][role]["builder"]),
                    file=str(raw["networks"][role]["file"]),
                    sha256=str(raw["networks"][role]["sha256"]),
                    parameters=int(raw["networks"][role]["parameters"]),
                )
                for role, _ in pipeline
            }
            return cls(
                model_version=str(raw["model_version"]),
                networks=networks,
                raw=raw,
                pipeline=pipeline,
                method=str(raw.get("method", "C")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"{path}: malformed manifest ({exc!r})") from None


def _device_scope(device: str) -> contextlib.AbstractContextManager[Any]:
    """A context that places computation on the requested device, for the active backend."""
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be auto, cpu or gpu, not {device!r}")
    if device == "auto":
        return contextlib.nullcontext()
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if device == "gpu" and not tf.config.list_physical_devices("GPU"):
            raise WeightsError("model.device = 'gpu' but TensorFlow sees no GPU")
        return tf.device("/GPU:0" if device == "gpu" else "/CPU:0")
    if backend == "jax":
        import jax

        try:
            target = jax.devices(device)[0]
        except RuntimeError as exc:
            raise WeightsError(f"model.device = {device!r} but JAX has none: {exc}") from None
        return jax.default_device(target)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _dtype_policy(precision: str) -> Iterator[None]:
    import keras

    if precision not in PRECISION_POLICIES:
        raise ValueError(
            f"precision must be one of {', '.join(PRECISION_POLICIES)}, not {precision!r}"
        )
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(PRECISION_POLICIES[precision])
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


class Cascade:
    """The loaded two-network cascade, ready to denoise HU slices of any size.

    Also runs the comparison methods' pipelines (``stages``): each stage's network
    either outputs the image or a difference map subtracted from the stage's input.
    """

    def __init__(
        self,
        perceptual: Any = None,
        difference: Any = None,
        *,
        model_version: str,
        batch_size: int = 4,
        device: str = "auto",
        precision: str = "float32",
        stages: list[tuple[Any, str]] | None = None,
        method: str = "C",
        engine: str = "auto",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
        if stages is None:
            if perceptual is None or difference is None:
                raise TypeError("Cascade needs perceptual and difference networks, or stages")
            stages = [(perceptual, "image"), (difference, "difference")]
        if not stages or any(output not in STAGE_OUTPUTS for _, output in stages):
            raise ValueError(f"stages: each stage's output must be one of {STAGE_OUTPUTS}")
        import keras

        from ldct_node.model.fused import compile_cascade

        self.model_version = model_version
        self.method = method
        self.batch_size = batch_size
        self.device = device
        self.precision = precision
        self._scope = _device_scope(device)
        inp = keras.Input(shape=(None, None, 1), name="ldct")
        x = inp
        for index, (net, output) in enumerate(stages, start=1):
            pred = keras.ops.cast(net(x), "float32")
            if output == "image":
                x = pred
            else:
                name = "remove_difference" if index == len(stages) else f"remove_difference{index}"
                x = keras.layers.Subtract(name=name, dtype="float32")(
                    [keras.ops.cast(x, "float32"), pred]
                )
        self.model = keras.Model(inp, x, name="ldct_cascade")
        self._fused = None
        # The fused graph implements the paper's cascade (image stage, then difference).
        if engine != "keras" and [output for _, output in stages] == ["image", "difference"]:
            with self._scope:
                self._fused = compile_cascade(stages[0][0], stages[1][0], precision=precision)
        if self._fused is None and engine == "fused":
            raise ValueError("engine 'fused' needs the DRL cascade (C); use 'keras' or 'auto'")
        #: The engine in use: "fused" or "keras".
        self.engine = "fused" if self._fused is not None else "keras"

    def warm_up(self, size: int = 64) -> None:
        """Run one small slice, so that graph tracing is not paid by the first job."""
        self.denoise(np.zeros((size, size), np.float32))

    def predict_model_range(self, batch: np.ndarray) -> np.ndarray:
        """Run the networks on a float32 ``(N, H, W, 1)`` batch in the model range."""
        with self._scope:
            if self._fused is not None:
                return self._fused(batch)
            return np.asarray(self.model.predict_on_batch(batch), dtype=np.float32)

    @classmethod
    def load(
        cls,
        weights_dir: str | Path,
        *,
        batch_size: int = 4,
        device: str = "auto",
        precision: str = "float32",
        engine: str = "auto",
    ) -> Cascade:
        """Build both networks and load the weights named in ``weights_dir/MANIFEST.json``.

        Every weights file is checked against its sha256 before it is loaded.
        ``engine`` "auto" runs the fused graph (:mod:`ldct_node.model.fused`) when the
        networks are DRLs, "keras" the Keras models as built (the reference).
        """
        from ldct_node.model.networks import NETWORK_BUILDERS

        weights_path = Path(weights_dir)
        manifest = Manifest.read(weights_path)
        nets: dict[str, Any] = {}
        with _dtype_policy(precision):
            for role, entry in manifest.networks.items():
                file = weights_path / entry.file
                if not file.is_file():
                    raise WeightsError(f"{file}: weights file named in the manifest is missing")
                if sha256_file(file) != entry.sha256:
                    raise WeightsError(f"{file}: sha256 does not match {MANIFEST_NAME}")
                builder = NETWORK_BUILDERS.get(entry.builder)
                if builder is None:
                    raise WeightsError(f"{file}: unknown network builder {entry.builder!r}")
                # Named by role: a pipeline may hold two networks of one architecture.
                net = builder(name=role)
                if net.count_params() != entry.parameters:
                    raise WeightsError(
                        f"{file}: manifest says {entry.parameters} parameters, "
                        f"{entry.builder} has {net.count_params()}"
                    )
                net.load_weights(str(file))
                nets[role] = net
            cascade = cls(
                model_version=manifest.model_version,
                batch_size=batch_size,
                device=device,
                precision=precision,
                stages=[(nets[role], output) for role, output in manifest.pipeline],
                method=manifest.method,
                engine=engine,
            )
        logger.info(
            "loaded cascade %s from %s (precision %s, device %s, %s engine)",
            manifest.model_version,
            weights_path,
            precision,
            device,
            cascade.engine,
        )
        return cascade

    def denoise(
        self,
        slices_hu: np.ndarray,
        *,
        blend: float = 0.0,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Denoise one slice ``(H, W)`` or a stack ``(N, H, W)`` given in HU.

        Parameters
        ----------
        slices_hu
            HU values; all slices of a stack share one size (any size, square or not).
        blend
            ``final = (1 - blend) * denoised + blend * input``, 0 <= blend <= 1.
        progress
            Called with the number of slices finished after each batch.

        Returns
        -------
        np.ndarray
            float32 HU, same shape as ``slices_hu``.
        """
        if not 0.0 <= blend <= 1.0:
            raise ValueError(f"blend must be within [0, 1], got {blend}")
        hu = np.asarray(slices_hu, dtype=np.float32)
        if hu.ndim not in (2, 3) or min(hu.shape[-2:]) < 1:
            raise ValueError(f"slices_hu must be (H, W) or (N, H, W), got shape {hu.shape}")
        single = hu.ndim == 2
        stack = hu[None] if single else hu
        out = np.empty_like(stack)
        for start in range(0, stack.shape[0], self.batch_size):
            batch = hu_to_model(stack[start : start + self.batch_size])[..., None]
            pred = self.predict_model_range(batch)
            # The networks never saw values outside the model range: clip to it.
            out[start : start + len(batch)] = model_to_hu(np.clip(pred[..., 0], 0.0, 1.0))
            if progress is not None:
                progress(len(batch))
        outside = (stack < HU_MIN) | (stack > HU_MIN + HU_RANGE)
        out = blend_with_input(np.where(outside, stack, out), stack, blend)
        return out[0] if single else out


def blend_with_input(denoised: np.ndarray, source: np.ndarray, blend: float) -> np.ndarray:
    """``(1 - blend) * denoised + blend * source`` (float32); blend 0 returns ``denoised``."""
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"blend must be within [0, 1], got {blend}")
    if blend == 0.0:
        return denoised
    return ((1.0 - blend) * denoised + blend * source).astype(np.float32)
