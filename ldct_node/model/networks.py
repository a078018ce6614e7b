"""Network builders for the denoising cascade (DRL, DRL-P, CNN10; README, "Bundled weights").

Every builder is a pure function returning a fresh, uncompiled ``keras.Model`` that
takes single-channel images of any size, ``(batch, height, width, 1)``, in the model
range ``m = (HU + 1024) / 4096`` and returns the same shape. Only Keras 3 APIs are
used, so the networks run on the TensorFlow backend and under ``KERAS_BACKEND=jax``.

Precision: the last convolution and the residual add are pinned to float32. Under a
``mixed_float16`` or ``bfloat16`` policy the hidden layers run in reduced precision,
but adding a reduced-precision correction to the input would quantise the output
image itself (bfloat16 resolves only 1/256 of the model range, i.e. 16 HU), so the
head stays float32. With the default float32 policy this changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import keras
import numpy as np

logger = logging.getLogger(__name__)

FILTERS = 64
"""Feature channels of every hidden layer of DRL and CNN10."""

DRL_DILATIONS = (2, 3, 4, 3)
"""Dilation rates of DRL's conv2..conv5."""

_HEAD_DTYPE = "float32"


def _image_input() -> keras.KerasTensor:
    return keras.Input(shape=(None, None, 1), name="image")


def _conv_relu(x: keras.KerasTensor, kernel: int, name: str) -> keras.KerasTensor:
    """Plain convolution followed by ReLU (no normalisation)."""
    x = keras.layers.Conv2D(
        FILTERS, kernel, padding="same", kernel_initializer="he_normal", name=name
    )(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _conv_bn_relu(
    x: keras.KerasTensor, name: str, dilation: int = 1, kernel: int = 3
) -> keras.KerasTensor:
    """Convolution (with bias, as the published parameter counts include it) + BN + ReLU."""
    x = keras.layers.Conv2D(
        FILTERS,
        kernel,
        padding="same",
        dilation_rate=dilation,
        kernel_initializer="he_normal",
        name=name,
    )(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _head(
    x: keras.KerasTensor, image: keras.KerasTensor, residual: bool, name: str
) -> keras.KerasTensor:
    """Linear 3x3 convolution to one channel, optionally added to the input image.

    Its kernel starts at zero, so an untrained DRL is the identity (residual) or
    predicts no difference: training starts from "change nothing" instead of adding a
    random image of several hundred HU, which short runs otherwise spend their first
    epochs undoing. The other layers keep their He-normal start, so gradients flow.
    """
    out = keras.layers.Conv2D(
        1, 3, padding="same", kernel_initializer="zeros", dtype=_HEAD_DTYPE, name=name
    )(x)
    if residual:
        out = keras.layers.Add(dtype=_HEAD_DTYPE, name="residual_add")([out, image])
    return out


def build_drl(name: str = "drl", residual: bool = True) -> keras.Model:
    """Build the dilated residual learning network (DRL) of Ansari et al.

    conv1: 5x5, 64, ReLU -> conv2..conv5: dilated 3x3, 64, d = 2, 3, 4, 3, each
    conv + BN + ReLU -> concat(conv5, conv2) -> conv6: dilated 3x3, 64, d = 2,
    BN, ReLU -> concat(conv6, conv1) -> conv7: 3x3, 1, linear -> + input.
    All convolutions use 'same' padding, so any image size works. 225,601 parameters
    (1,664 + 4 x 37,184 + 74,048 + 1,153) whether or not ``residual`` is set.

    Parameters
    ----------
    name
        Model name.
    residual
        Add the input image to the output (the network then learns the correction).
        ``False`` makes the output the conv7 map itself; the parameter count and all
        layer names are the same, so weights are interchangeable structurally.

    Returns
    -------
    keras.Model
        Uncompiled model mapping ``(batch, H, W, 1)`` to ``(batch, H, W, 1)``.
    """
    image = _image_input()
    conv1 = _conv_relu(image, 5, "conv1")
    x = conv1
    feats: list[keras.KerasTensor] = []
    for index, dilation in enumerate(DRL_DILATIONS, start=2):
        x = _conv_bn_relu(x, f"conv{index}", dilation=dilation)
        feats.append(x)
    conv2, conv5 = feats[0], feats[-1]
    x = keras.layers.Concatenate(name="concat_conv5_conv2")([conv5, conv2])
    conv6 = _conv_bn_relu(x, "conv6", dilation=2)
    x = keras.layers.Concatenate(name="concat_conv6_conv1")([conv6, conv1])
    out = _head(x, image, residual, "conv7")
    return keras.Model(image, out, name=name)


def build_drl_perceptual(name: str = "drl_perceptual") -> keras.Model:
    """Network 1 of the cascade: DRL (residual) trained LDCT -> NDCT with MSE + perceptual."""
    return build_drl(name=name, residual=True)


def build_drl_difference(name: str = "drl_difference") -> keras.Model:
    """Network 2 of the cascade: DRL that predicts the difference map ``Y_hat - Y``.

    Its input is network 1's output ``Y_hat`` and its target the residual error
    ``Y_hat - Y``, a noise-like map near zero, not an image. Adding the input image
    back (DRL's residual connection) would force the convolutions to first cancel the
    whole image, so the difference network is DRL with ``residual=False``: the same
    graph and the same 225,601 parameters, output taken before the add.
    Inference is ``final = Y_hat - diff_pred``.
    """
    return build_drl(name=name, residual=False)


def build_cnn10(name: str = "cnn10", residual: bool = False) -> keras.Model:
    """Build the ten-layer CNN of Wu et al. (335,873 parameters).

    conv 3x3 1 -> 64, ReLU (640) -> 9 x [conv 3x3 64 -> 64 + BN + ReLU] (9 x 37,184)
    -> conv 3x3 64 -> 1, linear (577); 'same' padding throughout.

    Parameters
    ----------
    name
        Model name.
    residual
        Add the input image to the output. Wu et al. train CNN10 to predict the
        difference map, hence the default ``False``.
    """
    image = _image_input()
    x = _conv_relu(image, 3, "conv1")
    for index in range(2, 11):
        x = _conv_bn_relu(x, f"conv{index}")
    out = _head(x, image, residual, "conv11")
    return keras.Model(image, out, name=name)


NETWORK_BUILDERS: dict[str, Callable[..., keras.Model]] = {
    "drl": build_drl,
    "drl_perceptual": build_drl_perceptual,
    "drl_difference": build_drl_difference,
    "cnn10": build_cnn10,
}
"""Builders by the architecture name recorded in checkpoints and weights/MANIFEST.json."""


def _iter_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _iter_layers(layer)
        else:
            yield layer


def model_flops_per_pixel(model: keras.Model) -> float:
    """Floating-point operations per output pixel of a full-resolution conv network.

    Counts ``2 * kh * kw * cin * cout`` (one multiply and one add per weight) for every
    ``Conv2D`` layer, nested models included; biases, batch normalisation, activations
    and concatenations are ignored (well under 1 % for DRL and CNN10). Multiply by
    ``height * width`` for the cost of one image.

    Parameters
    ----------
    model
        A built Keras model whose convolutions all keep the input resolution.

    Raises
    ------
    TypeError
        If ``model`` is not a ``keras.Model``.
    ValueError
        If ``model`` has a strided convolution (the count would not be per output
        pixel) or no ``Conv2D`` layer at all.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model, got {type(model).__name__}")
    total = 0.0
    n_conv = 0
    for layer in _iter_layers(model):
        if not isinstance(layer, keras.layers.Conv2D):
            continue
        if tuple(layer.strides) != (1, 1):
            raise ValueError(
                f"model: layer {layer.name!r} has strides {layer.strides}; "
                "per-pixel FLOPs are defined only for full-resolution networks"
            )
        # kernel is (kh, kw, cin / groups, cout): its size is the MAC count per pixel.
        total += 2.0 * float(np.prod(layer.kernel.shape))
        n_conv += 1
    if n_conv == 0:
        raise ValueError(f"model {model.name!r} has no Conv2D layer")
    return total
