"""Losses for the cascade: MSE and the VGG16 perceptual loss.

Images are in the model range ``m = (HU + 1024) / 4096`` (HU -1024..3072 -> 0..1),
shaped ``(batch, height, width, 1)``. The perceptual term compares VGG16 ImageNet
features after the last convolution of blocks 1-4 (``block1_conv2``, ``block2_conv2``,
``block3_conv3``, ``block4_conv3``) of both images, grayscale replicated to three
channels with VGG16's own 'caffe' preprocessing. Only ``keras.ops`` is used, so the
loss works in ``model.fit`` on the TensorFlow backend and under ``KERAS_BACKEND=jax``.

Scale of the terms. The perceptual distance is the literal "mean squared distance
averaged over the four maps", without any normalisation of feature magnitudes, and it
is six to seven orders of magnitude larger than the MSE in model range. Measured with
the ImageNet weights on 64x64 patches of real CT slices (pydicom-data ``693_UNCI.dcm``
skull + brain, and pydicom's ``CT_small.dcm``) plus Gaussian noise of the given
standard deviation, white or smoothed (sigma 1 px, CT-like correlated texture):

==================  ==========  =======  ==========  ========================
patch               noise (HU)  MSE      perceptual  0.1 x perceptual / MSE
==================  ==========  =======  ==========  ========================
skull+brain, white  10          6.0e-06  9.9e+01     1.7e+06
skull+brain, white  25          3.7e-05  9.2e+02     2.5e+06
skull+brain, white  50          1.5e-04  4.3e+03     2.9e+06
skull+brain, corr.  25          3.7e-05  2.0e+03     5.3e+06
CT_small, white     25          3.7e-05  8.7e+02     2.3e+06
CT_small, corr.     25          3.8e-05  2.0e+03     5.3e+06
flat brain, corr.   10          6.0e-06  2.1e+03     3.5e+07
==================  ==========  =======  ==========  ========================

So with ``perceptual_weight=0.1`` the MSE term is numerically negligible in the total
(Adam is invariant to the overall loss scale, but not to the ratio of the two terms);
``block3_conv3`` contributes most of the distance, then ``block2_conv2``. Equal
contributions would need a weight of about 1e-8 (3e-9 to 4e-8 on these patches).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import keras
from keras import ops

from ldct_node.choices import PerceptualNorm

logger = logging.getLogger(__name__)

VGG_FEATURE_LAYERS = ("block1_conv2", "block2_conv2", "block3_conv3", "block4_conv3")
"""VGG16 layers whose outputs the perceptual loss compares: last conv of blocks 1-4."""

VGG_CAFFE_MEANS_BGR = (103.939, 116.779, 123.68)
"""ImageNet channel means subtracted by VGG16 'caffe' preprocessing, in BGR order."""

DEFAULT_PERCEPTUAL_WEIGHT = 0.1

MIN_EXTRACTOR_SIZE = 8
"""Smallest image side that still leaves block 4 at least one pixel (three 2x pools)."""


def vgg_preprocess(m: Any) -> Any:
    """Turn model-range images into VGG16 inputs.

    Scales ``m`` so the model range [0, 1] maps to 0..255, replicates the channel to three
    (BGR) and subtracts the ImageNet means, as ``keras.applications.vgg16.preprocess_input``
    does for an RGB image whose three channels are equal. Values outside [0, 1] are not
    clipped: a clip would zero the perceptual gradient there, and since the perceptual
    term outweighs the MSE by orders of magnitude, nothing would then stop a network's
    output drifting out of range (seen in training).

    Parameters
    ----------
    m
        Tensor or array ``(batch, height, width, 1)`` in the model range.

    Returns
    -------
    tensor
        ``(batch, height, width, 3)`` float tensor.

    Raises
    ------
    ValueError
        If ``m`` is not rank 4 with a single channel.
    """
    m = ops.convert_to_tensor(m)
    if len(m.shape) != 4 or m.shape[-1] != 1:
        raise ValueError(f"m must have shape (batch, height, width, 1), got {tuple(m.shape)}")
    # float32 even under mixed precision: 0..255 in float16 would lose the fine detail.
    m = ops.cast(m, "float32")
    gray = m * 255.0
    means = ops.cast(ops.convert_to_tensor(VGG_CAFFE_MEANS_BGR), gray.dtype)
    # Broadcasting (..., 1) against (3,) replicates the channel and centres it in one op.
    return gray - means


def _frozen_feature_model(base: keras.Model, name: str) -> keras.Model:
    outputs = [base.get_layer(layer).output for layer in VGG_FEATURE_LAYERS]
    extractor = keras.Model(base.input, outputs, name=name)
    extractor.trainable = False
    return extractor


def load_vgg_extractor(weights: str | os.PathLike[str] = "imagenet") -> keras.Model:
    """Build the frozen VGG16 feature extractor used by the perceptual loss.

    Parameters
    ----------
    weights
        ``"imagenet"``: Keras' own ImageNet weights (its cache under ``~/.keras``, or a
        download). Otherwise the path of a local weights file for
        ``keras.applications.VGG16(include_top=False)``: a Keras 3 ``.weights.h5``
        (e.g. ``../shared/vgg16/vgg16_imagenet_notop.weights.h5``) or Keras' legacy
        ``vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5``, for air-gapped sites.

    Returns
    -------
    keras.Model
        Non-trainable model taking ``(batch, H, W, 3)`` VGG-preprocessed images (see
        :func:`vgg_preprocess`) and returning the four feature maps of
        :data:`VGG_FEATURE_LAYERS`. Images must be at least 8 x 8.

    Raises
    ------
    FileNotFoundError
        If ``weights`` is a path that does not exist.
    ValueError
        If ``weights`` is a file Keras cannot load into VGG16's conv base.
    """
    if isinstance(weights, str) and weights == "imagenet":
        base = keras.applications.VGG16(
            include_top=False, weights="imagenet", input_shape=(None, None, 3)
        )
        logger.info("Loaded VGG16 ImageNet weights from the Keras cache")
        return _frozen_feature_model(base, "vgg16_features")
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"weights: VGG16 weights file {str(path)!r} does not exist")
    if not path.name.endswith((".h5", ".hdf5")):
        raise ValueError(f"weights: {str(path)!r} is not a .weights.h5 or .h5 Keras weights file")
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(None, None, 3))
    try:
        base.load_weights(path)
    except (ValueError, KeyError, OSError) as exc:
        raise ValueError(f"weights: cannot load {str(path)!r} into VGG16: {exc}") from exc
    logger.info("Loaded VGG16 weights from %s", path)
    return _frozen_feature_model(base, "vgg16_features")


def _check_extractor(extractor: Any) -> None:
    if not isinstance(extractor, keras.Model):
        raise TypeError(f"extractor must be a keras.Model, got {type(extractor).__name__}")


def mse(y_true: Any, y_pred: Any) -> Any:
    """Per-sample mean squared error, shape ``(batch,)``."""
    y_true = ops.convert_to_tensor(y_true)
    y_pred = ops.convert_to_tensor(y_pred)
    return ops.mean(ops.square(y_pred - ops.cast(y_true, y_pred.dtype)), axis=(1, 2, 3))


def perceptual_distance(extractor: keras.Model, a: Any, b: Any) -> Any:
    """Per-sample perceptual distance between two batches of model-range images.

    For each feature map ``k`` of ``extractor`` the mean over height, width and channels
    of ``(phi_k(a) - phi_k(b))^2``; the result is the average over the maps. Both
    images go through :func:`vgg_preprocess` and then one extractor call (concatenated
    along the batch axis).

    Parameters
    ----------
    extractor
        Model from :func:`load_vgg_extractor` (or any feature model of that shape).
    a, b
        ``(batch, height, width, 1)`` tensors in the model range, height and width >= 8.

    Returns
    -------
    tensor
        Shape ``(batch,)``, float32; exactly 0 where ``a`` and ``b`` are equal.
    """
    _check_extractor(extractor)
    a = vgg_preprocess(a)
    b = ops.cast(vgg_preprocess(b), a.dtype)
    batch = ops.shape(a)[0]
    features = extractor(ops.concatenate([a, b], axis=0), training=False)
    if not isinstance(features, list | tuple):
        features = [features]
    per_map = []
    for feature in features:
        feature = ops.cast(feature, "float32")
        diff = feature[:batch] - feature[batch:]
        per_map.append(ops.mean(ops.square(diff), axis=(1, 2, 3)))
    return ops.mean(ops.stack(per_map, axis=0), axis=0)


class PerceptualMSELoss(keras.losses.Loss):
    """``MSE + perceptual_weight x perceptual distance``, a Keras compile loss.

    Per sample: ``mse(y_true, y_pred) + perceptual_weight *
    perceptual_distance(extractor, y_true, y_pred)``; Keras then averages over the batch
    (the default ``sum_over_batch_size`` reduction), so the reduced loss equals the mean
    MSE plus the weight times the mean perceptual distance.

    The extractor is frozen and is not part of the trained model, so only the trained
    model's weights change. It is not serialised by :meth:`get_config`: save models with
    ``save_weights`` (or recompile after loading a ``.keras`` file).

    Parameters
    ----------
    extractor
        Feature extractor, see :func:`perceptual_distance`.
    perceptual_weight
        Weight of the perceptual term, >= 0 (paper: 0.1).
    name
        Loss name shown in logs.
    """

    def __init__(
        self,
        extractor: keras.Model,
        perceptual_weight: float = DEFAULT_PERCEPTUAL_WEIGHT,
        name: str = "perceptual_mse",
        perceptual_scale: float = 1.0,
        **kwargs: Any,
    ) -> None:
        _check_extractor(extractor)
        weight = float(perceptual_weight)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"perceptual_weight must be finite and >= 0, got {perceptual_weight}")
        scale = float(perceptual_scale)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"perceptual_scale must be finite and > 0, got {perceptual_scale}")
        super().__init__(name=name, **kwargs)
        self.extractor = extractor
        # The perceptual distance is divided by ``perceptual_scale`` before weighting
        # (see calibrate_perceptual_scale): 1 is the literal, unnormalised term.
        self.perceptual_weight = weight / scale
        self.perceptual_scale = scale

    def call(self, y_true: Any, y_pred: Any) -> Any:
        """Per-sample loss, shape ``(batch,)``."""
        total = mse(y_true, y_pred)
        if self.perceptual_weight:
            total = total + self.perceptual_weight * perceptual_distance(
                self.extractor, y_true, y_pred
            )
        return total

    def get_config(self) -> dict[str, Any]:
        """Serialisable settings; the extractor itself is not included."""
        config: dict[str, Any] = super().get_config()
        config["perceptual_weight"] = self.perceptual_weight * self.perceptual_scale
        config["perceptual_scale"] = self.perceptual_scale
        return config


def make_perceptual_mse_loss(
    extractor: keras.Model,
    perceptual_weight: float = DEFAULT_PERCEPTUAL_WEIGHT,
    perceptual_scale: float = 1.0,
) -> PerceptualMSELoss:
    """Network 1's training loss: ``MSE + perceptual_weight x perceptual / scale``.

    See :class:`PerceptualMSELoss`; usable directly as ``model.compile(loss=...)``.
    """
    return PerceptualMSELoss(
        extractor, perceptual_weight=perceptual_weight, perceptual_scale=perceptual_scale
    )


PERCEPTUAL_NORMS = tuple(n.value for n in PerceptualNorm)
"""How the perceptual term is scaled: literal, or in MSE units of the training pairs."""


def calibrate_perceptual_scale(
    extractor: keras.Model, ldct: Any, ndct: Any, batch_size: int = 32
) -> float:
    """Perceptual distance per unit of MSE between the training pairs.

    ``mean perceptual(ndct, ldct) / mean mse(ndct, ldct)`` over the given patches.
    Dividing the perceptual term by it expresses the term in MSE units of the data's
    own noise, so ``perceptual_weight = 0.1`` makes the term weigh a tenth of the MSE
    at the start of training, as a weight of 0.1 reads; the literal term outweighs the
    MSE about 10^6 times (module docstring).

    Parameters
    ----------
    extractor
        See :func:`perceptual_distance`.
    ldct, ndct
        Paired patches ``(n, h, w, 1)`` in the model range, n >= 1.

    Returns
    -------
    float
        The scale, > 0.

    Raises
    ------
    ValueError
        If the patches differ in shape, are empty, or are identical (no MSE to measure).
    """
    import numpy as np

    ldct = np.asarray(ldct, dtype=np.float32)
    ndct = np.asarray(ndct, dtype=np.float32)
    if ldct.shape != ndct.shape or ldct.ndim != 4 or len(ldct) == 0:
        raise ValueError(
            f"ldct, ndct: need equal non-empty (n, h, w, 1) arrays, got {ldct.shape} and "
            f"{ndct.shape}"
        )
    perceptual = 0.0
    squared = 0.0
    for start in range(0, len(ldct), batch_size):
        a, b = ndct[start : start + batch_size], ldct[start : start + batch_size]
        perceptual += float(ops.sum(perceptual_distance(extractor, a, b)))
        squared += float(ops.sum(mse(a, b)))
    if not squared > 0 or not perceptual > 0:
        raise ValueError("ldct, ndct: the pairs do not differ; nothing to calibrate on")
    return perceptual / squared
