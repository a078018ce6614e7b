"""Inference with the two-network cascade.

``final = Y_hat - diff_pred`` where ``Y_hat = net1(x)`` (the perceptual DRL) and
``diff_pred = net2(Y_hat)`` (the difference DRL), optionally blended with the input:
``(1 - blend) * final + blend * input``.

The networks work in a fixed "model range": HU -1024..3072 maps linearly to 0..1.
Pixels outside that range (padding outside the field of view, dense metal) are not
seen correctly by the networks, so they keep their input values.

Memory: with a ``memory_budget_mb`` the cascade sizes each network call to what is left
of the budget after what the process already holds: several slices per call while they
fit, else one slice, else overlapping tiles of one slice. A tile is extended on every
side by the networks' receptive-field radius (:func:`receptive_halo`, 34 pixels for the
DRL cascade), so each output pixel sees exactly the input it sees untiled and the tiled
result equals the untiled one (up to float rounding of the convolution kernels).
The budget is the process's (host) memory. Where the networks run on an accelerator
(a GPU under JAX) their activations live in its memory instead: a call then needs only
its input and output on the host, and is also sized to what the accelerator has free.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import resource
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ldct_node.malloc import M_MMAP_THRESHOLD, huge_pages_in_use, mallopt
from ldct_node.model.manifest import (
    MANIFEST_NAME,
    STAGE_OUTPUTS,
    Manifest,
    WeightsError,
    sha256_file,
)
from ldct_node.model.scaling import HU_MIN, HU_RANGE, hu_to_model, model_to_hu

logger = logging.getLogger(__name__)

NETWORK_ROLES = ("perceptual", "difference")
#: ``engine`` values of :class:`Cascade`: "fused" (:mod:`ldct_node.model.fused`, the
#: default where the networks are DRLs) or "keras" (the Keras models as built).
ENGINES = ("auto", "fused", "keras")
PRECISION_POLICIES = {
    "float32": "float32",
    # Variables stay float32 (the stored weights), compute runs in the low precision.
    "bfloat16": "mixed_bfloat16",
    "mixed_float16": "mixed_float16",
}


#: Working memory of one network call per input pixel (activations of both networks and
#: TensorFlow's scratch), by engine. Measured peak-RSS growth of a float32 call on a
#: 2-core AVX-512 CPU: fused 1,490 B at 512x512 (2,060 B at 256x256, where fixed costs
#: weigh more; issue 15 measured ~1,300 B at 2048x2048); keras 1,330 B at 512x512. On a
#: 2-core AVX2 EPYC with large allocations returned to the system
#: (:func:`return_large_allocations_to_the_system`): fused 1,290 B at 200x200 to 400x400,
#: the same on every call. Rounded up: the budget must hold.
BYTES_PER_PIXEL = {"fused": 1_800, "keras": 1_800}
#: Host memory of one network call per input pixel where the networks run on an
#: accelerator (their activations are in its memory): the batch in the model range, the
#: call's output copied back, and the HU conversions around them (float32 each).
HOST_BYTES_PER_PIXEL_ACCELERATED = 32
#: Whole-slice arrays :meth:`Cascade.denoise` holds besides the network call, per pixel
#: of the stack it is given: the float32 output, the out-of-range mask, the merged and
#: blended copies.
STACK_BYTES_PER_PIXEL = 24
#: Share of the budget left to what runs beside inference (the thread decoding the next
#: instance, the thread writing the previous one).
BUDGET_HEADROOM = 0.15
#: Smallest tile core (pixels per side): a budget too small for it is overrun (warned).
MIN_TILE_CORE = 64
#: Layers that do not look at neighbouring pixels (tiling does not change what they do).
_POINTWISE_LAYERS = frozenset(
    {
        "InputLayer",
        "BatchNormalization",
        "ReLU",
        "Activation",
        "Concatenate",
        "Add",
        "Subtract",
        "Multiply",
        "Dropout",
        "Rescaling",
    }
)


def receptive_halo(networks: Sequence[Any]) -> int | None:
    """Receptive-field radius (pixels) of the networks applied one after the other.

    The sum over every convolution of ``dilation * (kernel - 1) / 2``: an output pixel
    depends on input pixels at most this far away (Chebyshev distance), and no farther
    along a chain through every convolution. For DRL that chain exists (conv1 -> conv2
    -> ... -> conv7: 2 + 2 + 3 + 4 + 3 + 2 + 1 = 17), so 17 per DRL is exact and the
    cascade's is 34.

    Returns
    -------
    int | None
        None when a network holds a layer that is not a stride-1 'same' convolution or
        a pixel-wise layer (pooling, resampling...): such networks are never tiled.
    """
    import keras

    from ldct_node.model.networks import _iter_layers

    total = 0
    for net in networks:
        for layer in _iter_layers(net):
            if isinstance(layer, keras.layers.Conv2D) and type(layer).__name__ == "Conv2D":
                if tuple(layer.strides) != (1, 1) or layer.padding != "same":
                    return None
                (kh, kw), (dh, dw) = layer.kernel_size, layer.dilation_rate
                total += max(dh * (kh - 1) // 2, dw * (kw - 1) // 2)
            elif type(layer).__name__ not in _POINTWISE_LAYERS:
                return None
    return total


@dataclass(frozen=True)
class Tile:
    """One tile of a slice: the input region the networks see (``source``, the core
    extended by the halo and clipped to the slice), the output region it fills
    (``target``) and where that lies within the tile (``crop``)."""

    source: tuple[slice, slice]
    target: tuple[slice, slice]
    crop: tuple[slice, slice]


def _split(length: int, core: int) -> list[tuple[int, int]]:
    """``[0, length)`` cut into near-equal parts of at most ``core``."""
    parts = max(1, math.ceil(length / core))
    edges = [round(i * length / parts) for i in range(parts + 1)]
    return list(itertools.pairwise(edges))


def plan_tiles(height: int, width: int, halo: int, max_pixels: int) -> list[Tile]:
    """Overlapping tiles covering a ``height x width`` slice, each at most ``max_pixels``
    pixels with its halo (unless that is below a ``MIN_TILE_CORE`` core plus halo).

    Full-width strips when a strip of ``MIN_TILE_CORE`` rows fits, else square tiles.
    Cores are cut near-equal, so there are few distinct tile shapes (each a new trace).
    """
    if height < 1 or width < 1:
        raise ValueError(f"height, width: must be >= 1, got {height}x{width}")
    if halo < 0:
        raise ValueError(f"halo: must be >= 0, got {halo}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels: must be >= 1, got {max_pixels}")
    if height * width <= max_pixels:
        whole = (slice(0, height), slice(0, width))
        return [Tile(whole, whole, whole)]
    if width * (MIN_TILE_CORE + 2 * halo) <= max_pixels:
        core_y, core_x = max_pixels // width - 2 * halo, width
    else:
        core_y = core_x = max(MIN_TILE_CORE, math.isqrt(max_pixels) - 2 * halo)
    tiles = []
    for y0, y1 in _split(height, core_y):
        for x0, x1 in _split(width, core_x):
            sy0, sy1 = max(0, y0 - halo), min(height, y1 + halo)
            sx0, sx1 = max(0, x0 - halo), min(width, x1 + halo)
            tiles.append(
                Tile(
                    source=(slice(sy0, sy1), slice(sx0, sx1)),
                    target=(slice(y0, y1), slice(x0, x1)),
                    crop=(slice(y0 - sy0, y1 - sy0), slice(x0 - sx0, x1 - sx0)),
                )
            )
    return tiles


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc``), else its peak so far."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


#: Allocations at least this large get their own mapping, returned to the system when
#: freed (glibc's ``M_MMAP_THRESHOLD``, fixed instead of its default sliding threshold).
LARGE_ALLOCATION_BYTES = 1 << 20
_large_allocations_returned = False


def return_large_allocations_to_the_system() -> bool:
    """Make freed activation buffers leave the process (glibc only; once per process).

    glibc raises its mmap threshold each time a large mapped block is freed, so after a
    few network calls the activations come from the heap, whose freed pages stay
    resident and fragment: measured here, resident memory after 200x200, 300x300 and
    400x400 calls drifted from 540 to 874 MB and peaks grew by up to 2,300 B per pixel
    instead of 1,290, so a budget planned from "resident now" was overrun. With a fixed
    1 MiB threshold every call grows by the same 1,290 B per pixel and gives it all back.
    Returns whether the setting is in force.
    """
    global _large_allocations_returned
    if _large_allocations_returned:
        return True
    _large_allocations_returned = mallopt(M_MMAP_THRESHOLD, LARGE_ALLOCATION_BYTES)
    return _large_allocations_returned


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


def runs_on_accelerator(device: str) -> bool:
    """Whether the active Keras backend runs the networks on an accelerator for
    ``model.device`` (``gpu``; ``auto`` where the backend's default device is one)."""
    if device == "cpu":
        return False
    if device == "gpu":
        return True
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            return str(jax.default_backend()) != "cpu"
        if backend == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
        if backend == "torch":
            import torch

            return bool(torch.cuda.is_available())
    except Exception:  # a broken accelerator runtime: plan as for the CPU (the safe side)
        logger.debug("could not tell whether the backend has an accelerator", exc_info=True)
    return False


def accelerator_free_bytes() -> int | None:
    """Memory still free on the default accelerator (JAX's allocator statistics), or None
    where the backend does not say."""
    import keras

    if keras.backend.backend() != "jax":
        return None
    try:
        import jax

        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return max(0, int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))


def pooled_free_bytes() -> int:
    """Memory the host's tensor allocator holds free for the next call, else 0.

    With oneDNN's operations on (TensorFlow turns them on by itself on CPUs with
    AVX-512 VNNI or BF16) TensorFlow's CPU allocator keeps freed tensors in a pool
    that never goes back to the system: resident memory stays at the largest call's
    working set, and the next call reuses it. Counting that pool as taken planned a
    1024x1024 slice under a 1,000 MB budget in calls of 17,424 pixels; counting its free
    part as free, 56,818 (AVX-512 EPYC; 101,624 with oneDNN off). The pool's free part
    is at least its peak use less its use now (the pool grew to the peak, and only what
    was touched is resident), so that is what is returned.
    TensorFlow's plain allocator keeps no statistics (its memory goes back when
    freed): 0 there, and under other backends.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        return 0
    import tensorflow as tf

    try:
        info = tf.config.experimental.get_memory_info("CPU:0")
    except (ValueError, RuntimeError):  # "Allocator stats not available": not pooled
        return 0
    return max(0, int(info.get("peak", 0)) - int(info.get("current", 0)))


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
        memory_budget_mb: float | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if memory_budget_mb is not None and not memory_budget_mb > 0:
            raise ValueError(f"memory_budget_mb: must be > 0, got {memory_budget_mb}")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
        if stages is None:
            if perceptual is None or difference is None:
                raise TypeError("Cascade needs perceptual and difference networks, or stages")
            stages = [(perceptual, "image"), (difference, "difference")]
        if not stages or any(output not in STAGE_OUTPUTS for _, output in stages):
            raise ValueError(f"stages: each stage's output must be one of {STAGE_OUTPUTS}")
        import keras

        from ldct_node.model.fused import compile_cascade, shape_specialised

        self.model_version = model_version
        self.method = method
        self.batch_size = batch_size
        self.device = device
        self.precision = precision
        self._scope = _device_scope(device)
        #: Whether the networks run on an accelerator (see :meth:`pixels_per_call`).
        self.accelerated = runs_on_accelerator(device)
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
        # Its graph compiles per batch size (JAX): batches of powers of two only, so the
        # last one of a series, padded up to the next, never exceeds the planned call.
        self._batches_in_powers_of_two = self._fused is not None and shape_specialised(
            keras.backend.backend()
        )
        #: Process memory (MB) inference sizes its calls to stay under; None: unbounded.
        self.memory_budget_mb = memory_budget_mb
        #: Receptive-field radius of the whole pipeline; None: never tiled.
        self.halo = receptive_halo([net for net, _ in stages])
        self._warned_budget = False
        if memory_budget_mb is not None and not return_large_allocations_to_the_system():
            logger.warning(
                "model.memory_budget_mb: freed memory may stay resident with this C "
                "library; the budget can be overrun"
            )
        if memory_budget_mb is not None and self.halo is None:
            logger.warning(
                "model.memory_budget_mb: the %s networks cannot be tiled; only the batch "
                "follows the budget",
                method,
            )

    def warm_up(self, size: int = 64) -> None:
        """Run one small slice, so that graph tracing is not paid by the first job.

        Where the graph compiles per shape on an accelerator (JAX on a GPU), a full
        batch of 512x512 slices instead, the size a CT series most often has.
        """
        if self._batches_in_powers_of_two and self.accelerated:
            calls: list[int] = []
            self.denoise(np.zeros((self.batch_size, 512, 512), np.float32), progress=calls.append)
            # What the memory plan allows shows here (a budget too small for the host's
            # share cuts the batch): say it once, as the operator's figure to check.
            logger.info(
                "warmed up on the accelerator: %d slice(s) of 512x512 per call "
                "(model.batch_size %d, model.memory_budget_mb %s)",
                max(calls, default=0),
                self.batch_size,
                "unbounded" if self.memory_budget_mb is None else f"{self.memory_budget_mb:g}",
            )
            return
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
        memory_budget_mb: float | None = None,
    ) -> Cascade:
        """Build both networks and load the weights named in ``weights_dir/MANIFEST.json``.

        Every weights file is checked against its sha256 before it is loaded.
        ``engine`` "auto" runs the fused graph (:mod:`ldct_node.model.fused`) when the
        networks are DRLs, "keras" the Keras models as built (the reference).
        ``memory_budget_mb`` bounds the process's memory during inference (see
        :meth:`denoise`).
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
                memory_budget_mb=memory_budget_mb,
            )
        logger.info(
            "loaded cascade %s from %s (precision %s, device %s (%s), %s engine, huge pages %s)",
            manifest.model_version,
            weights_path,
            precision,
            device,
            "accelerator" if cascade.accelerated else "cpu",
            cascade.engine,
            "on" if huge_pages_in_use() else "off",
        )
        return cascade

    def pixels_per_call(self, stack_pixels: int = 0) -> int:
        """How many input pixels one network call may take now under the budget.

        What is left of ``memory_budget_mb`` (less ``BUDGET_HEADROOM``) after what the
        process holds now and the whole-stack arrays of a ``stack_pixels`` stack,
        divided by the engine's working memory per pixel. On an accelerator the call's
        activations are in its memory: the host needs only
        ``HOST_BYTES_PER_PIXEL_ACCELERATED`` per pixel, and the call is also sized to
        what the accelerator has free, where the backend says. Never below one
        ``MIN_TILE_CORE`` tile with its halo (a warning says the budget is overrun).
        """
        if stack_pixels < 0:
            raise ValueError(f"stack_pixels: must be >= 0, got {stack_pixels}")
        if self.memory_budget_mb is None:
            return sys.maxsize
        resident = resident_bytes()
        held = resident - min(resident, pooled_free_bytes())  # the pool is reused, not new
        free = (
            self.memory_budget_mb * (1.0 - BUDGET_HEADROOM) * 2**20
            - held
            - STACK_BYTES_PER_PIXEL * stack_pixels
        )
        if self.accelerated:
            pixels = int(free // HOST_BYTES_PER_PIXEL_ACCELERATED)
            device_free = accelerator_free_bytes()
            if device_free is not None:
                device_pixels = (
                    device_free * (1.0 - BUDGET_HEADROOM) // BYTES_PER_PIXEL[self.engine]
                )
                pixels = min(pixels, int(device_pixels))
        else:
            pixels = int(free // BYTES_PER_PIXEL[self.engine])
        floor = (MIN_TILE_CORE + 2 * (self.halo or 0)) ** 2
        if pixels < floor:
            if not self._warned_budget:
                logger.warning(
                    "model.memory_budget_mb = %g is too small for this process (%d MB "
                    "in use before inference, %d MB more resident as the allocator's "
                    "free pool): running the smallest tiles, which may exceed it",
                    self.memory_budget_mb,
                    held // 2**20,
                    (resident - held) // 2**20,
                )
                self._warned_budget = True
            pixels = floor
        return pixels

    def denoise(
        self,
        slices_hu: np.ndarray,
        *,
        blend: float = 0.0,
        progress: Callable[[int], None] | None = None,
        max_pixels: int | None = None,
    ) -> np.ndarray:
        """Denoise one slice ``(H, W)`` or a stack ``(N, H, W)`` given in HU.

        Parameters
        ----------
        slices_hu
            HU values; all slices of a stack share one size (any size, square or not).
        blend
            ``final = (1 - blend) * denoised + blend * input``, 0 <= blend <= 1.
        progress
            Called with the number of slices finished after each batch (with 0 after
            each tile of a tiled slice).
        max_pixels
            Input pixels per network call; default from ``memory_budget_mb``
            (:meth:`pixels_per_call`, unbounded without a budget). Up to
            ``batch_size`` slices go into one call while they fit; a slice larger than
            this runs as overlapping tiles (:func:`plan_tiles`) with the same result.

        Returns
        -------
        np.ndarray
            float32 HU, same shape as ``slices_hu``.
        """
        if not 0.0 <= blend <= 1.0:
            raise ValueError(f"blend must be within [0, 1], got {blend}")
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"max_pixels: must be >= 1, got {max_pixels}")
        hu = np.asarray(slices_hu, dtype=np.float32)
        if hu.ndim not in (2, 3) or min(hu.shape[-2:]) < 1:
            raise ValueError(f"slices_hu must be (H, W) or (N, H, W), got shape {hu.shape}")
        single = hu.ndim == 2
        stack = hu[None] if single else hu
        out = np.empty_like(stack)
        height, width = stack.shape[1:]
        limit = self.pixels_per_call(stack.size) if max_pixels is None else max_pixels
        if height * width <= limit or self.halo is None:
            per_call = max(1, min(self.batch_size, limit // (height * width)))
            if self._batches_in_powers_of_two:
                per_call = 1 << (per_call.bit_length() - 1)  # down to a power of two
            for start in range(0, stack.shape[0], per_call):
                batch = hu_to_model(stack[start : start + per_call])[..., None]
                pred = self.predict_model_range(batch)
                # The networks never saw values outside the model range: clip to it.
                count = len(batch)
                out[start : start + count] = model_to_hu(np.clip(pred[..., 0], 0.0, 1.0))
                del batch, pred
                if progress is not None:
                    progress(count)
        else:
            tiles = plan_tiles(height, width, self.halo, limit)
            logger.debug(
                "denoising %dx%d slices as %d tiles (halo %d, <= %d pixels per call)",
                height,
                width,
                len(tiles),
                self.halo,
                limit,
            )
            for index in range(stack.shape[0]):
                for tile in tiles:
                    batch = hu_to_model(stack[index][tile.source])[None, ..., None]
                    pred = self.predict_model_range(batch)[0, ..., 0][tile.crop]
                    out[index][tile.target] = model_to_hu(np.clip(pred, 0.0, 1.0))
                    del batch, pred
                    if progress is not None:
                        progress(0)  # a tile done: lets the caller stop between tiles
                if progress is not None:
                    progress(1)
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
