"""Tests of the network builders: exact parameter counts, shapes, wiring, FLOPs."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import keras
import numpy as np
import pytest

from ldct_node.model.networks import (
    DRL_DILATIONS,
    NETWORK_BUILDERS,
    build_cnn10,
    build_drl,
    build_drl_difference,
    build_drl_perceptual,
    model_flops_per_pixel,
)

DRL_PARAMS = 225_601
CNN10_PARAMS = 335_873


@pytest.fixture(autouse=True)
def _seeded() -> None:
    keras.utils.set_random_seed(1234)


@pytest.mark.parametrize(
    ("builder", "expected"),
    [
        (lambda: build_drl(residual=True), DRL_PARAMS),
        (lambda: build_drl(residual=False), DRL_PARAMS),
        (build_drl_perceptual, DRL_PARAMS),
        (build_drl_difference, DRL_PARAMS),
        (lambda: build_cnn10(residual=False), CNN10_PARAMS),
        (lambda: build_cnn10(residual=True), CNN10_PARAMS),
    ],
    ids=["drl", "drl-no-residual", "drl_perceptual", "drl_difference", "cnn10", "cnn10-residual"],
)
def test_parameter_counts_are_exact(builder: Callable[[], keras.Model], expected: int) -> None:
    model = builder()
    assert model.count_params() == expected


def test_drl_parameter_breakdown() -> None:
    model = build_drl()
    counts = {
        name: model.get_layer(name).count_params()
        + (model.get_layer(f"{name}_bn").count_params() if name not in ("conv1", "conv7") else 0)
        for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "conv7")
    }
    assert counts == {
        "conv1": 1664,
        "conv2": 37184,
        "conv3": 37184,
        "conv4": 37184,
        "conv5": 37184,
        "conv6": 74048,
        "conv7": 1153,
    }


def test_drl_layer_configuration() -> None:
    model = build_drl()
    assert model.get_layer("conv1").kernel_size == (5, 5)
    for index, dilation in enumerate(DRL_DILATIONS, start=2):
        layer = model.get_layer(f"conv{index}")
        assert layer.kernel_size == (3, 3)
        assert layer.dilation_rate == (dilation, dilation)
        assert layer.padding == "same"
    assert model.get_layer("conv6").dilation_rate == (2, 2)
    assert model.get_layer("conv7").filters == 1
    assert model.get_layer("conv7").activation is keras.activations.linear
    assert DRL_DILATIONS == (2, 3, 4, 3)


def _models() -> Iterator[tuple[str, keras.Model]]:
    for name, builder in NETWORK_BUILDERS.items():
        yield name, builder()


@pytest.mark.parametrize("shape", [(1, 64, 64, 1), (3, 37, 53, 1), (2, 16, 96, 1), (1, 9, 9, 1)])
def test_output_shape_equals_input_shape(shape: tuple[int, int, int, int]) -> None:
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    for name, model in _models():
        y = keras.ops.convert_to_numpy(model(x, training=False))
        assert y.shape == shape, name
        assert np.all(np.isfinite(y)), name


@pytest.mark.parametrize("build", [build_drl, build_cnn10])
def test_residual_flag_adds_exactly_the_input(build: Callable[..., keras.Model]) -> None:
    with_input = build(residual=True)
    without = build(residual=False)
    without.set_weights(with_input.get_weights())
    x = np.random.default_rng(1).random((2, 24, 31, 1), dtype=np.float32)
    diff = keras.ops.convert_to_numpy(with_input(x) - without(x))
    np.testing.assert_allclose(diff, x, atol=1e-5)


def test_registry_builds_named_models_with_the_right_head() -> None:
    assert set(NETWORK_BUILDERS) == {"drl", "drl_perceptual", "drl_difference", "cnn10"}
    residual = {}
    for name, model in _models():
        assert model.name == name
        residual[name] = any(isinstance(layer, keras.layers.Add) for layer in model.layers)
    # Network 2 predicts a difference map: no input add (see build_drl_difference).
    assert residual == {
        "drl": True,
        "drl_perceptual": True,
        "drl_difference": False,
        "cnn10": False,
    }


def _support_radius(model: keras.Model, size: int = 81) -> int:
    """Largest Chebyshev distance from a single-pixel change at which the output moves."""
    rng = np.random.default_rng(2)
    # The output conv starts at zero (see networks._head); give it weights so the
    # impulse response shows the wiring.
    head = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)][-1]
    kernel, bias = head.get_weights()
    head.set_weights([rng.normal(0, 0.1, kernel.shape).astype(np.float32), bias])
    base = rng.random((1, size, size, 1), dtype=np.float32)
    bumped = base.copy()
    centre = size // 2
    bumped[0, centre, centre, 0] += 0.5
    changed = np.abs(
        keras.ops.convert_to_numpy(model(bumped, training=False) - model(base, training=False))
    )[0, :, :, 0]
    rows, cols = np.nonzero(changed > 1e-6)
    return int(max(np.abs(rows - centre).max(), np.abs(cols - centre).max()))


def test_drl_receptive_field_reflects_the_dilations() -> None:
    # 5x5 -> dilations 2,3,4,3 -> dilation 2 -> 3x3: radius 2 + 2+3+4+3 + 2 + 1 = 17.
    # Without dilations the radius would be 8, so this checks the dilated wiring.
    assert _support_radius(build_drl_perceptual()) == 17


def test_untrained_networks_start_from_change_nothing() -> None:
    x = np.random.default_rng(5).random((2, 24, 30, 1), dtype=np.float32)
    identity = keras.ops.convert_to_numpy(build_drl_perceptual()(x, training=False))
    np.testing.assert_allclose(identity, x, atol=1e-6)
    no_difference = keras.ops.convert_to_numpy(build_drl_difference()(x, training=False))
    np.testing.assert_allclose(no_difference, 0.0, atol=1e-6)


def test_cnn10_receptive_field() -> None:
    # Eleven 3x3 convolutions: radius 11.
    assert _support_radius(build_cnn10()) == 11


def test_flops_per_pixel() -> None:
    assert model_flops_per_pixel(build_drl()) == 2 * (
        5 * 5 * 64 + 4 * 9 * 64 * 64 + 9 * 128 * 64 + 9 * 128
    )
    assert model_flops_per_pixel(build_cnn10()) == 2 * (9 * 64 + 9 * 9 * 64 * 64 + 9 * 64)
    # Nested models are counted too.
    inner = build_cnn10()
    image = keras.Input((None, None, 1))
    outer = keras.Model(image, build_drl_difference()(inner(image)))
    assert model_flops_per_pixel(outer) == model_flops_per_pixel(inner) + model_flops_per_pixel(
        build_drl()
    )


def test_flops_per_pixel_rejects_bad_models() -> None:
    with pytest.raises(TypeError, match="model"):
        model_flops_per_pixel("drl")
    image = keras.Input((None, None, 1))
    strided = keras.Model(image, keras.layers.Conv2D(4, 3, strides=2)(image))
    with pytest.raises(ValueError, match="strides"):
        model_flops_per_pixel(strided)
    dense = keras.Model(image, keras.layers.ReLU()(image))
    with pytest.raises(ValueError, match="no Conv2D"):
        model_flops_per_pixel(dense)


def test_head_stays_float32_under_mixed_precision() -> None:
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = build_drl()
        assert model.get_layer("conv3").compute_dtype == "float16"
        x = np.random.default_rng(3).random((1, 16, 16, 1), dtype=np.float32)
        y = model(x, training=False)
        assert keras.backend.standardize_dtype(y.dtype) == "float32"
        diff = build_drl_difference()(x, training=False)
        assert keras.backend.standardize_dtype(diff.dtype) == "float32"
    finally:
        keras.config.set_dtype_policy(previous)
