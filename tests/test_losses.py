"""Tests of the MSE + VGG16 perceptual loss.

They use the converted ImageNet VGG16 conv base at ../shared/vgg16 beside the repository
when it is there and fall back to the random VGG-shaped extractor otherwise; the
parameter id of the ``extractor`` fixture names which one ran.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from _vgg_util import random_vgg_like_extractor

from ldct_node.lab.losses import (
    VGG_CAFFE_MEANS_BGR,
    VGG_FEATURE_LAYERS,
    PerceptualMSELoss,
    load_vgg_extractor,
    make_perceptual_mse_loss,
    mse,
    perceptual_distance,
    vgg_preprocess,
)
from ldct_node.model.networks import build_drl_perceptual

VGG_FILE = Path(__file__).resolve().parents[2] / "shared/vgg16/vgg16_imagenet_notop.weights.h5"
needs_vgg_file = pytest.mark.skipif(not VGG_FILE.is_file(), reason=f"{VGG_FILE} not present")


@pytest.fixture(
    scope="module",
    params=["vgg16_imagenet_file" if VGG_FILE.is_file() else "random_vgg_like"],
)
def extractor(request: pytest.FixtureRequest) -> keras.Model:
    if request.param == "vgg16_imagenet_file":
        return load_vgg_extractor(VGG_FILE)
    return random_vgg_like_extractor(seed=0)


def _phantom(size: int = 32, batch: int = 1) -> np.ndarray:
    """Model-range disk phantom: air, soft tissue (40 HU), a bone insert (700 HU)."""
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    hu = np.full((size, size), -1000.0)
    hu[xx**2 + yy**2 < (0.45 * size) ** 2] = 40.0
    hu[(xx - size / 8) ** 2 + yy**2 < (0.12 * size) ** 2] = 700.0
    m = ((hu + 1024.0) / 4096.0).astype(np.float32)
    return np.repeat(m[None, :, :, None], batch, axis=0)


def _noise(shape: tuple[int, ...], sigma_hu: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * sigma_hu / 4096.0).astype(np.float32)


def _np(x: object) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


# --- preprocessing -------------------------------------------------------------------


def test_vgg_preprocess_matches_keras_caffe_preprocessing() -> None:
    m = np.random.default_rng(0).uniform(-0.2, 1.2, (2, 5, 7, 1)).astype(np.float32)
    rgb = np.repeat(m * 255.0, 3, axis=-1)
    expected = keras.applications.vgg16.preprocess_input(rgb.copy())
    got = _np(vgg_preprocess(m))
    assert got.shape == (2, 5, 7, 3)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_vgg_preprocess_values_extend_linearly_beyond_the_range() -> None:
    m = np.array([-0.5, 0.0, 0.5, 1.0, 3.0], np.float32).reshape(1, 1, 5, 1)
    got = _np(vgg_preprocess(m))[0, 0]
    means = np.array(VGG_CAFFE_MEANS_BGR, np.float32)
    # No clipping: out-of-range values keep a gradient (see vgg_preprocess).
    np.testing.assert_allclose(got[0], -127.5 - means, atol=1e-4)
    np.testing.assert_allclose(got[1], -means, atol=1e-4)
    np.testing.assert_allclose(got[2], 127.5 - means, atol=1e-4)
    np.testing.assert_allclose(got[3], 255.0 - means, atol=1e-4)
    np.testing.assert_allclose(got[4], 765.0 - means, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 5, 7), (2, 5, 7, 3), (5, 7, 1)])
def test_vgg_preprocess_rejects_wrong_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="m must have shape"):
        vgg_preprocess(np.zeros(shape, np.float32))


# --- extractors ----------------------------------------------------------------------


def test_missing_weights_path_raises_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "vgg16.weights.h5"
    with pytest.raises(FileNotFoundError, match="weights"):
        load_vgg_extractor(missing)
    with pytest.raises(FileNotFoundError, match="weights"):
        load_vgg_extractor(str(missing))


# Keras itself warns while saving/loading the mismatched file; the error is what matters.
@pytest.mark.filterwarnings("ignore:Skipping nested container:UserWarning")
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_unusable_weights_files_raise_value_error(tmp_path: Path) -> None:
    wrong_suffix = tmp_path / "vgg16.bin"
    wrong_suffix.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="weights"):
        load_vgg_extractor(wrong_suffix)
    junk = tmp_path / "junk.weights.h5"
    junk.write_bytes(b"not an hdf5 file")
    with pytest.raises(ValueError, match="weights"):
        load_vgg_extractor(junk)
    other = tmp_path / "other.weights.h5"
    random_vgg_like_extractor().save_weights(other)
    with pytest.raises(ValueError, match="weights"):
        load_vgg_extractor(other)


def _saved_kernel(path: Path, layer_name: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        for group in f["layers"].values():
            if "vars" in group and group["vars"].attrs.get("name") == layer_name:
                return np.asarray(group["vars"]["0"])
    raise KeyError(layer_name)


@needs_vgg_file
def test_vgg_file_loads_into_the_feature_extractor() -> None:
    model = load_vgg_extractor(VGG_FILE)
    assert len(model.outputs) == len(VGG_FEATURE_LAYERS)
    for output, name in zip(model.outputs, VGG_FEATURE_LAYERS, strict=True):
        assert output is model.get_layer(name).output
    assert not model.trainable
    assert model.trainable_weights == []
    for name in ("block1_conv1", "block2_conv2", "block4_conv3"):
        np.testing.assert_array_equal(
            model.get_layer(name).get_weights()[0], _saved_kernel(VGG_FILE, name)
        )
    feats = model(vgg_preprocess(_phantom(64)))
    assert [tuple(f.shape) for f in feats] == [
        (1, 64, 64, 64),
        (1, 32, 32, 128),
        (1, 16, 16, 256),
        (1, 8, 8, 512),
    ]


def test_random_extractor_is_vgg_shaped_frozen_and_seeded() -> None:
    a = random_vgg_like_extractor(seed=3, width=4)
    assert not a.trainable
    assert a.trainable_weights == []
    for name in VGG_FEATURE_LAYERS:
        a.get_layer(name)  # same layer names as VGG16
    feats = a(vgg_preprocess(_phantom(32)))
    assert [tuple(f.shape) for f in feats] == [
        (1, 32, 32, 4),
        (1, 16, 16, 8),
        (1, 8, 8, 16),
        (1, 4, 4, 32),
    ]
    same = random_vgg_like_extractor(seed=3, width=4)
    other = random_vgg_like_extractor(seed=4, width=4)
    for wa, ws, wo in zip(a.get_weights(), same.get_weights(), other.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, ws)
        assert not np.array_equal(wa, wo)
    with pytest.raises(ValueError, match="width"):
        random_vgg_like_extractor(width=0)


# --- distances and the combined loss --------------------------------------------------


def test_mse_is_per_sample_mean_squared_error() -> None:
    rng = np.random.default_rng(5)
    a = rng.random((3, 8, 9, 1), dtype=np.float32)
    b = rng.random((3, 8, 9, 1), dtype=np.float32)
    np.testing.assert_allclose(_np(mse(a, b)), ((a - b) ** 2).mean(axis=(1, 2, 3)), rtol=1e-6)


def test_perceptual_distance_zero_for_identical_inputs(extractor: keras.Model) -> None:
    clean = _phantom(32, batch=2)
    d = _np(perceptual_distance(extractor, clean, clean.copy()))
    assert d.shape == (2,)
    assert np.all(d == 0.0)


def test_perceptual_distance_positive_per_sample_and_symmetric(extractor: keras.Model) -> None:
    clean = _phantom(32, batch=2)
    noisy = clean.copy()
    noisy[1] += _noise(noisy[1].shape, 25.0)
    d = _np(perceptual_distance(extractor, clean, noisy))
    assert d[0] == 0.0
    assert d[1] > 0.0
    np.testing.assert_allclose(_np(perceptual_distance(extractor, noisy, clean)), d, rtol=1e-4)


def test_perceptual_distance_grows_with_perturbation(extractor: keras.Model) -> None:
    clean = _phantom(32)
    noise = _noise(clean.shape, 1.0, seed=7)
    d = [
        float(_np(perceptual_distance(extractor, clean, clean + s * noise))[0]) for s in (5, 20, 80)
    ]
    assert 0.0 < d[0] < d[1] < d[2]


def test_perceptual_distance_on_non_square_images(extractor: keras.Model) -> None:
    a = _phantom(53)[:, :37]
    b = a + _noise(a.shape, 30.0)
    d = _np(perceptual_distance(extractor, a, b))
    assert d.shape == (1,)
    assert np.isfinite(d).all()
    assert d[0] > 0


def test_total_loss_is_mse_plus_weighted_perceptual(extractor: keras.Model) -> None:
    y_true = _phantom(32, batch=3)
    y_pred = y_true + _noise(y_true.shape, 20.0, seed=11)
    expected = (
        _np(mse(y_true, y_pred)).mean()
        + 0.1 * _np(perceptual_distance(extractor, y_true, y_pred)).mean()
    )
    loss = make_perceptual_mse_loss(extractor)
    assert isinstance(loss, PerceptualMSELoss)
    assert loss.perceptual_weight == 0.1
    np.testing.assert_allclose(float(loss(y_true, y_pred)), expected, rtol=1e-5)
    per_sample = _np(loss.call(y_true, y_pred))
    assert per_sample.shape == (3,)
    mse_only = make_perceptual_mse_loss(extractor, perceptual_weight=0.0)
    np.testing.assert_allclose(
        float(mse_only(y_true, y_pred)), _np(mse(y_true, y_pred)).mean(), rtol=1e-6
    )
    assert float(loss(y_true, y_true)) == 0.0


def test_loss_argument_validation(extractor: keras.Model) -> None:
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="perceptual_weight"):
            make_perceptual_mse_loss(extractor, perceptual_weight=bad)
    with pytest.raises(TypeError, match="extractor"):
        make_perceptual_mse_loss(lambda x: x)
    with pytest.raises(TypeError, match="extractor"):
        perceptual_distance(None, _phantom(16), _phantom(16))


def test_two_step_fit_trains_the_model_not_the_extractor(extractor: keras.Model) -> None:
    keras.utils.set_random_seed(0)
    y = _phantom(32, batch=4)
    x = y + _noise(y.shape, 40.0, seed=3)
    model = build_drl_perceptual()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=make_perceptual_mse_loss(extractor))
    before = [w.copy() for w in model.get_weights()]
    extractor_before = [w.copy() for w in extractor.get_weights()]
    history = model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert int(model.optimizer.iterations) == 2
    assert len(losses) == 1
    assert np.isfinite(losses[0]) and losses[0] > 0
    assert any(not np.array_equal(b, a) for b, a in zip(before, model.get_weights(), strict=True))
    for b, a in zip(extractor_before, extractor.get_weights(), strict=True):
        np.testing.assert_array_equal(b, a)


def test_calibrated_scale_puts_the_perceptual_term_in_mse_units() -> None:
    from ldct_node.lab.losses import calibrate_perceptual_scale, make_perceptual_mse_loss

    extractor = random_vgg_like_extractor(seed=3)
    rng = np.random.default_rng(0)
    ndct = rng.uniform(0.2, 0.3, (10, 16, 16, 1)).astype(np.float32)
    ldct = (ndct + rng.normal(0, 0.01, ndct.shape)).astype(np.float32)
    scale = calibrate_perceptual_scale(extractor, ldct, ndct, batch_size=4)
    perceptual = np.asarray(perceptual_distance(extractor, ndct, ldct))
    squared = np.mean((ldct - ndct) ** 2, axis=(1, 2, 3))
    assert scale == pytest.approx(float(perceptual.sum() / squared.sum()), rel=1e-4)
    # With the scale, weight 0.1 makes the term a tenth of the MSE on these pairs.
    loss = make_perceptual_mse_loss(extractor, 0.1, perceptual_scale=scale)
    total = float(loss(ndct, ldct))
    assert total == pytest.approx(1.1 * float(squared.mean()), rel=0.05)
    assert loss.get_config()["perceptual_weight"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="do not differ"):
        calibrate_perceptual_scale(extractor, ndct, ndct)
    with pytest.raises(ValueError, match="ldct, ndct"):
        calibrate_perceptual_scale(extractor, ldct[:2], ndct)
    with pytest.raises(ValueError, match="perceptual_scale"):
        make_perceptual_mse_loss(extractor, 0.1, perceptual_scale=0.0)
