"""The inference graph of the cascade, fused and compiled for speed.

The Keras models of :mod:`ldct_node.model.networks` are what training builds and what
the weights files hold. For inference this module turns the two DRL networks into one
compiled function of the active Keras backend, computing exactly the same thing
faster:

- batch normalisation is folded into the preceding convolution's kernel and bias
  (inference uses the moving statistics, an affine map per channel), so each layer is
  one convolution + bias + ReLU that oneDNN runs as a single fused primitive;
- dilated convolutions run natively where the CPU has AVX-512. ``tf.nn.convolution``
  (what Keras calls) emulates dilation on CPU with SpaceToBatch/BatchToSpace copies
  around a dense convolution; ``tf.nn.conv2d`` with ``dilations`` goes straight to
  oneDNN's dilated kernel, 1.3x faster with AVX-512 (375-399 against 296-302 GFLOP/s,
  3x3 64 -> 64 at 512x512 on a 2-core EPYC). Without AVX-512 it is the other way round,
  and by far: oneDNN runs a padded convolution as im2col + GEMM there (47-49 GFLOP/s
  with oneDNN capped at AVX2 on the same CPU), while the dense convolution on the
  space-to-batch images takes its direct AVX2 kernel (185-189 GFLOP/s);
- the head (3x3, 128 -> 1 channel) runs as one 1x1 convolution of each concatenated
  input to the kernel's 9 taps, then 9 shifted single-channel adds: the same sums in
  another order, without the 32 MB concatenation a 256x256 slice needs, and with
  a GEMM that oneDNN runs well (a 3x3 convolution to one channel runs at ~4 GFLOP/s
  on an AVX2 CPU: 30 -> 6 ms per head at 256x256, 140 -> 21 ms at 512x512);
- both networks are one graph (one ``tf.function`` or ``jax.jit``), so nothing goes
  back to numpy between them;
- precision ``bfloat16`` is true bfloat16 compute with bfloat16 weights (AVX-512 BF16
  or AMX on CPUs, tensor cores on GPUs), not Keras' mixed policy that re-casts float32
  variables at every call. The first convolution (it sees the image itself, which
  bfloat16 would quantise to 16 HU near water; it is under 1 % of the work) and the
  head with the residual add stay float32, as in the Keras models.

Measured side by side (``benchmarks/inference.py``; README, "Performance"), folding and
native dilation give about 1.17x the Keras graph in float32 on a 2-core AVX-512 CPU, and
bfloat16 about 1.77x float32 with an output within 0.2 HU RMS of float32 on real CT slices.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: Layer name -> dilation of the DRL graph (see :func:`ldct_node.model.networks.build_drl`).
_DRL_LAYERS = (
    ("conv1", 1),
    ("conv2", 2),
    ("conv3", 3),
    ("conv4", 4),
    ("conv5", 3),
    ("conv6", 2),
    ("conv7", 1),
)

#: Compute dtype of the hidden layers per ``model.precision``.
HIDDEN_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "mixed_float16": "float16"}

#: A compiled cascade: model-range batch ``(N, H, W, 1)`` float32 in, float32 out.
InferenceFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class FoldedConv:
    """One convolution with its batch normalisation folded in (float32 numpy)."""

    kernel: np.ndarray
    bias: np.ndarray
    dilation: int


def batch_bucket(count: int) -> int:
    """The batch size a shape-specialising engine (JAX) runs ``count`` slices as: the
    next power of two, so that a few compiled shapes serve every batch size."""
    if count < 1:
        raise ValueError(f"count: must be >= 1, got {count}")
    return 1 << (count - 1).bit_length()


def shape_specialised(backend: str) -> bool:
    """Whether ``backend``'s compiled graph is specialised to its input's shape (jax.jit;
    a tf.function with a None-shaped signature is traced once for all shapes)."""
    return backend == "jax"


def head_taps(kernel: np.ndarray, splits: tuple[int, ...]) -> tuple[np.ndarray, ...] | None:
    """A 3x3 kernel to one channel as 1x1 kernels to its 9 taps, one per input part.

    Parameters
    ----------
    kernel
        ``(3, 3, C, 1)``, 'same' padding, dilation 1.
    splits
        Channel counts of the concatenated inputs, summing to ``C``.

    Returns
    -------
    tuple[np.ndarray, ...] | None
        One ``(1, 1, c, 9)`` kernel per part; tap ``3 * i + j`` is row ``i``, column
        ``j`` of the 3x3 window. None if ``kernel`` is not of that form.
    """
    if kernel.ndim != 4 or kernel.shape[:2] != (3, 3) or kernel.shape[3] != 1:
        return None
    if sum(splits) != kernel.shape[2]:
        return None
    taps = np.transpose(kernel[:, :, :, 0], (2, 0, 1)).reshape(kernel.shape[2], 9)
    bounds = np.cumsum((0, *splits))
    return tuple(
        np.ascontiguousarray(taps[lo:hi].reshape(1, 1, hi - lo, 9))
        for lo, hi in itertools.pairwise(bounds)
    )


@dataclass(frozen=True)
class FoldedDRL:
    """The seven folded convolutions of a DRL and whether it adds its input."""

    convs: tuple[FoldedConv, ...]
    residual: bool


def fold_drl(model: Any) -> FoldedDRL | None:
    """Fold a DRL Keras model's batch normalisations into its convolutions.

    Parameters
    ----------
    model
        A model built by :func:`ldct_node.model.networks.build_drl` (or one of its
        perceptual / difference variants).

    Returns
    -------
    FoldedDRL | None
        None when ``model`` is not a DRL (another architecture): the caller then
        runs the Keras model itself.
    """
    import keras

    names = {layer.name: layer for layer in model.layers}
    convs: list[FoldedConv] = []
    for name, dilation in _DRL_LAYERS:
        conv = names.get(name)
        if not isinstance(conv, keras.layers.Conv2D) or tuple(conv.dilation_rate) != (
            dilation,
            dilation,
        ):
            return None
        kernel = np.asarray(keras.ops.convert_to_numpy(conv.kernel), np.float64)
        bias = np.asarray(keras.ops.convert_to_numpy(conv.bias), np.float64)
        bn = names.get(f"{name}_bn")
        if isinstance(bn, keras.layers.BatchNormalization):
            gamma, beta, mean, var = (
                np.asarray(keras.ops.convert_to_numpy(w), np.float64)
                for w in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance)
            )
            # BN(conv(x)) = s * (conv(x) - mean) + beta with s = gamma / sqrt(var + eps):
            # scale the kernel's output channels by s and shift the bias.
            scale = gamma / np.sqrt(var + bn.epsilon)
            kernel = kernel * scale
            bias = (bias - mean) * scale + beta
        convs.append(FoldedConv(kernel.astype(np.float32), bias.astype(np.float32), dilation))
    return FoldedDRL(tuple(convs), residual="residual_add" in names)


#: How the TensorFlow graph runs a dilated convolution (``compile_cascade(dilation=)``).
DILATIONS = ("auto", "native", "space_to_batch")

#: oneDNN's ISA names at or above AVX-512 (``ONEDNN_MAX_CPU_ISA`` caps what it uses):
#: AVX512_CORE..., AVX10_1_512..., ALL (its default).
_AVX512_ISAS = ("AVX512", "AVX10", "AMX", "ALL")


def cpu_has_avx512(cpuinfo: str | None = None) -> bool:
    """Whether oneDNN may use AVX-512 here: the CPU lists ``avx512f`` (Linux
    ``/proc/cpuinfo``) and ``ONEDNN_MAX_CPU_ISA``, if set, does not cap it below. Where
    the CPU's flags cannot be read, True (the native dilation, as before)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap and not cap.startswith(_AVX512_ISAS):
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return True
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return "avx512f" in line.split(":", 1)[-1].split()
    return True


def native_dilation(dilation: str = "auto") -> bool:
    """Whether TensorFlow's graph takes dilations natively (``tf.nn.conv2d``) or by
    space-to-batch (``tf.nn.convolution``): ``auto`` picks native with AVX-512 only."""
    if dilation not in DILATIONS:
        raise ValueError(f"dilation must be one of {', '.join(DILATIONS)}, not {dilation!r}")
    if dilation == "auto":
        return cpu_has_avx512()
    return dilation == "native"


def _conv_op(backend: str, native: bool = True) -> Callable[..., Any]:
    """``conv(x, kernel, bias, dilation)``, 'same' padding, for the active backend;
    ``native``: TensorFlow takes a dilation natively, else by space-to-batch."""
    if backend == "tensorflow":
        import tensorflow as tf

        def tf_conv(x: Any, kernel: Any, bias: Any, dilation: int) -> Any:
            if dilation > 1 and not native:
                # SpaceToBatch, a dense convolution of the sub-images, BatchToSpace.
                dense = tf.nn.convolution(x, kernel, 1, "SAME", dilations=dilation)
                return tf.nn.bias_add(dense, bias)
            # tf.nn.conv2d takes the dilation natively (oneDNN), unlike tf.nn.convolution;
            # Conv2D + BiasAdd (+ Relu) is then rewritten into one fused oneDNN op.
            return tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "SAME", dilations=dilation), bias)

        return tf_conv
    import keras

    def keras_conv(x: Any, kernel: Any, bias: Any, dilation: int) -> Any:
        return keras.ops.conv(x, kernel, 1, "same", dilation_rate=dilation) + bias

    return keras_conv


def _graph(
    nets: tuple[FoldedDRL, ...], hidden_dtype: str, backend: str, native: bool = True
) -> Callable[[Any], Any]:
    """The cascade as a function of backend tensors (keras.ops plus the conv op)."""
    import keras

    ops = keras.ops
    conv = _conv_op(backend, native)
    low = hidden_dtype != "float32"

    def weights(layer: FoldedConv, dtype: str) -> tuple[Any, Any]:
        return ops.convert_to_tensor(layer.kernel, dtype), ops.convert_to_tensor(layer.bias, dtype)

    # Constants built once, in the dtype each layer computes in.
    plans = []
    for net in nets:
        layers = []
        for index, layer in enumerate(net.convs):
            first_or_head = index in (0, len(net.convs) - 1)
            dtype = "float32" if (first_or_head or not low) else hidden_dtype
            layers.append((*weights(layer, dtype), layer.dilation, dtype))
        head = net.convs[-1]
        # The head's input is concat(conv6, conv1): 64 + 64 channels.
        taps = head_taps(head.kernel, (net.convs[5].kernel.shape[3], net.convs[0].kernel.shape[3]))
        tap_plan = None
        if taps is not None and head.dilation == 1:
            tap_plan = (
                tuple(ops.convert_to_tensor(t, "float32") for t in taps),
                ops.convert_to_tensor(head.bias, "float32"),
            )
        plans.append((layers, net.residual, tap_plan))
    no_bias = ops.zeros((9,), "float32")

    def tap_head(parts: tuple[Any, ...], plan: tuple[tuple[Any, ...], Any]) -> Any:
        kernels, bias = plan
        z = conv(ops.cast(parts[0], "float32"), kernels[0], no_bias, 1)
        for part, kernel in zip(parts[1:], kernels[1:], strict=True):
            z = z + conv(ops.cast(part, "float32"), kernel, no_bias, 1)
        # out[y, x] = sum over taps (i, j) of z[y + i - 1, x + j - 1, 3 i + j], zero
        # outside the image: 'same' padding.
        zp = ops.pad(z, [[0, 0], [1, 1], [1, 1], [0, 0]])
        out = bias
        for i in range(3):
            for j in range(3):
                tap = 3 * i + j
                out = out + zp[:, i : (i - 2) or None, j : (j - 2) or None, tap : tap + 1]
        return out

    def drl(
        image: Any,
        layers: list[tuple[Any, Any, int, str]],
        residual: bool,
        tap_plan: tuple[tuple[Any, ...], Any] | None,
    ) -> Any:
        def step(x: Any, i: int, relu: bool = True) -> Any:
            kernel, bias, dilation, dtype = layers[i]
            y = conv(ops.cast(x, dtype), kernel, bias, dilation)
            return ops.relu(y) if relu else y

        conv1 = ops.cast(step(image, 0), hidden_dtype)
        x = conv1
        feats = []
        for i in range(1, 5):
            x = step(x, i)
            feats.append(x)
        conv6 = step(ops.concatenate([feats[-1], feats[0]], axis=-1), 5)
        if tap_plan is not None:
            head = tap_head((conv6, conv1), tap_plan)
        else:
            head = step(ops.concatenate([conv6, conv1], axis=-1), 6, relu=False)
        return head + image if residual else head

    def cascade(batch: Any) -> Any:
        first, second = plans
        y_hat = drl(batch, *first)
        return y_hat - drl(y_hat, *second)

    return cascade


def compile_cascade(
    perceptual: Any, difference: Any, *, precision: str = "float32", dilation: str = "auto"
) -> InferenceFn | None:
    """One compiled function running both networks, or None if they are not DRLs.

    Parameters
    ----------
    perceptual, difference
        The loaded Keras networks (network 1 and network 2 of the cascade).
    precision
        ``float32``, ``bfloat16`` or ``mixed_float16`` (hidden layers in float16).
    dilation
        How TensorFlow runs the dilated convolutions: ``native``, ``space_to_batch``
        or ``auto`` (native where oneDNN may use AVX-512: :func:`native_dilation`).

    Returns
    -------
    InferenceFn | None
        ``fn(batch)`` maps a float32 ``(N, H, W, 1)`` batch in the model range to the
        cascade's float32 output of the same shape.
    """
    if precision not in HIDDEN_DTYPES:
        raise ValueError(f"precision must be one of {', '.join(HIDDEN_DTYPES)}, not {precision!r}")
    native = native_dilation(dilation)
    folded = (fold_drl(perceptual), fold_drl(difference))
    if folded[0] is None or folded[1] is None:
        return None
    import keras

    backend = keras.backend.backend()
    graph = _graph((folded[0], folded[1]), HIDDEN_DTYPES[precision], backend, native)
    if backend == "tensorflow":
        logger.debug("dilated convolutions: %s", "native" if native else "space-to-batch")
    if backend == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(
            graph,
            input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)],
            autograph=False,
            reduce_retracing=True,
        )

        def run_tf(batch: np.ndarray) -> np.ndarray:
            return np.asarray(compiled(tf.convert_to_tensor(batch, tf.float32)), np.float32)

        return run_tf
    if backend == "jax":
        import jax

        jitted = jax.jit(graph)

        def run_jax(batch: np.ndarray) -> np.ndarray:
            # jax.jit compiles once per input shape (seconds on a GPU): a series' last,
            # shorter batch runs padded with empty slices to a size compiled before.
            count = len(batch)
            size = batch_bucket(count)
            if size != count:
                pad = np.zeros((size - count, *batch.shape[1:]), batch.dtype)
                batch = np.concatenate([batch, pad])
            return np.asarray(jitted(batch), np.float32)[:count]

        return run_jax

    def run_eager(batch: np.ndarray) -> np.ndarray:
        return np.asarray(keras.ops.convert_to_numpy(graph(batch)), np.float32)

    return run_eager
