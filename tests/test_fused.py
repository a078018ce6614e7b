"""The fused inference graph computes what the Keras networks compute, in every precision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import BUNDLED_WEIGHTS
from pydicom.data import get_testdata_file

from ldct_node.dicom.io import decode_hu
from ldct_node.model.cascade import Cascade
from ldct_node.model.fused import (
    _conv_op,
    batch_bucket,
    compile_cascade,
    cpu_has_avx512,
    fold_drl,
    head_taps,
    native_dilation,
    shape_specialised,
)
from ldct_node.model.networks import build_cnn10, build_drl


def _rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.fixture(scope="module")
def keras_cascade(untrained_weights: Path) -> Cascade:
    return Cascade.load(untrained_weights, batch_size=2, engine="keras")


@pytest.fixture(scope="module")
def fused_cascade(untrained_weights: Path) -> Cascade:
    return Cascade.load(untrained_weights, batch_size=2)


def test_fused_is_the_default_for_drl_and_keras_stays_selectable(
    keras_cascade: Cascade, fused_cascade: Cascade
) -> None:
    assert fused_cascade.engine == "fused"
    assert keras_cascade.engine == "keras"


@pytest.mark.parametrize("shape", [(3, 64, 64), (1, 40, 72)])
def test_fused_float32_matches_keras(
    keras_cascade: Cascade, fused_cascade: Cascade, shape: tuple[int, int, int]
) -> None:
    rng = np.random.default_rng(5)
    hu = rng.normal(40, 60, shape).astype(np.float32)
    hu[:, :3] = -1000.0
    ref = keras_cascade.denoise(hu)
    out = fused_cascade.denoise(hu)
    # The untrained head changes pixels by hundreds of HU; folding BN is exact up to
    # float32 rounding.
    assert _rms(ref, hu) > 10.0
    np.testing.assert_allclose(out, ref, atol=0.05)


def test_batch_norm_statistics_are_folded(untrained_weights: Path) -> None:
    # Non-trivial moving statistics make a wrong fold visible.
    net = _drl_with_statistics(1)
    rng = np.random.default_rng(1)
    zero = build_drl(residual=False)  # second network: predicts no difference
    fn = compile_cascade(net, zero)
    assert fn is not None
    x = rng.uniform(0.2, 0.4, (2, 33, 47, 1)).astype(np.float32)
    expected = np.asarray(net.predict_on_batch(x))
    np.testing.assert_allclose(fn(x), expected, atol=2e-5)


def _drl_with_statistics(seed: int) -> object:
    """A DRL whose batch norms and head are not the untrained identity/zero."""
    net = build_drl()
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        if layer.name.endswith("_bn"):
            gamma, beta, mean, var = (np.asarray(w) for w in layer.get_weights())
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, gamma.shape).astype(np.float32),
                    rng.normal(0, 0.1, beta.shape).astype(np.float32),
                    rng.normal(0, 0.2, mean.shape).astype(np.float32),
                    rng.uniform(0.5, 2.0, var.shape).astype(np.float32),
                ]
            )
    head = net.get_layer("conv7")
    kernel, bias = head.get_weights()
    head.set_weights([rng.uniform(-0.05, 0.05, kernel.shape).astype(np.float32), bias])
    return net


@pytest.mark.parametrize("dilation", ["native", "space_to_batch"])
def test_both_ways_of_dilating_compute_the_keras_drl(dilation: str) -> None:
    """Natively (AVX-512) or by space-to-batch (AVX2 only): the same convolutions, on
    odd image sizes too (space-to-batch pads them to a multiple of the dilation)."""
    net = _drl_with_statistics(11)
    fn = compile_cascade(net, build_drl(residual=False), dilation=dilation)
    assert fn is not None
    x = np.random.default_rng(2).uniform(0.2, 0.4, (2, 33, 47, 1)).astype(np.float32)
    expected = np.asarray(net.predict_on_batch(x))
    assert float(np.abs(expected - x).max()) > 0.01
    np.testing.assert_allclose(fn(x), expected, atol=2e-5)


def test_space_to_batch_dilation_builds_a_dense_convolution_of_the_sub_images() -> None:
    import tensorflow as tf

    kernel = tf.constant(np.ones((3, 3, 4, 4), np.float32))
    bias = tf.zeros([4])
    spec = tf.TensorSpec([1, 16, 16, 4], tf.float32)
    for native, expected in ((True, set()), (False, {"SpaceToBatchND", "BatchToSpaceND"})):
        conv = _conv_op("tensorflow", native)
        graph = tf.function(lambda x, conv=conv: conv(x, kernel, bias, 2))
        types = {op.type for op in graph.get_concrete_function(spec).graph.get_operations()}
        assert types & {"SpaceToBatchND", "BatchToSpaceND"} == expected
    # Dilation 1 is a plain convolution either way.
    conv = _conv_op("tensorflow", False)
    graph = tf.function(lambda x: conv(x, kernel, bias, 1))
    types = {op.type for op in graph.get_concrete_function(spec).graph.get_operations()}
    assert "SpaceToBatchND" not in types and "Conv2D" in types


def test_dilation_is_native_only_where_onednn_may_use_avx512(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    avx2 = "processor : 0\nflags : fpu sse4_2 avx avx2 fma\n"
    avx512 = "processor : 0\nflags : fpu avx2 fma avx512f avx512bw avx512_bf16\n"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert not cpu_has_avx512(avx2)
    assert cpu_has_avx512(avx512)
    assert cpu_has_avx512("no flags line")  # unknown: as before, native
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not cpu_has_avx512(avx512)  # oneDNN is capped below AVX-512
    for cap in ("avx512_core_amx", "AVX10_1_512", "ALL"):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert cpu_has_avx512(avx512) and not cpu_has_avx512(avx2)
    assert native_dilation("native") and not native_dilation("space_to_batch")
    with pytest.raises(ValueError, match="dilation"):
        native_dilation("sideways")


def test_other_architectures_fall_back_to_keras() -> None:
    assert fold_drl(build_cnn10()) is None
    assert compile_cascade(build_cnn10(), build_drl()) is None
    with pytest.raises(ValueError, match="precision"):
        compile_cascade(build_drl(), build_drl(), precision="int8")


def _real_ct_slices() -> np.ndarray:
    """Real CT (pydicom-data, held out from training): one 512x512 slice."""
    path = get_testdata_file("693_UNCR.dcm")
    if path is None:
        pytest.skip("pydicom-data test files not installed")
    return decode_hu(pydicom.dcmread(path))[None]


def test_bfloat16_within_1_hu_rms_of_float32_on_real_ct() -> None:
    hu = _real_ct_slices()
    ref = Cascade.load(BUNDLED_WEIGHTS).denoise(hu)
    low = Cascade.load(BUNDLED_WEIGHTS, precision="bfloat16")
    assert low.engine == "fused"
    out = low.denoise(hu)
    # The trained cascade changes real slices by tens of HU; bf16 must not add 1 HU.
    assert _rms(ref, hu) > 5.0
    assert _rms(out, ref) < 1.0


def _conv3x3_same(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Reference 'same' 3x3 convolution (cross-correlation, as Keras) in float64."""
    n, h, w, _ = image.shape
    padded = np.pad(image.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, w, kernel.shape[3]))
    for i in range(3):
        for j in range(3):
            out += padded[:, i : i + h, j : j + w, :] @ kernel[i, j].astype(np.float64)
    return out


def test_head_taps_are_the_3x3_kernel_split_by_tap_and_input() -> None:
    rng = np.random.default_rng(7)
    kernel = rng.normal(0, 1, (3, 3, 5, 1)).astype(np.float32)
    taps = head_taps(kernel, (3, 2))
    assert taps is not None and [t.shape for t in taps] == [(1, 1, 3, 9), (1, 1, 2, 9)]
    # Projecting each part to the 9 taps, then adding the taps shifted, is the convolution.
    a, b = rng.normal(0, 1, (2, 6, 7, 3)), rng.normal(0, 1, (2, 6, 7, 2))
    z = a @ taps[0][0, 0] + b @ taps[1][0, 0]
    zp = np.pad(z, ((0, 0), (1, 1), (1, 1), (0, 0)))
    shifted = sum(zp[:, i : i + 6, j : j + 7, 3 * i + j] for i in range(3) for j in range(3))
    expected = _conv3x3_same(np.concatenate([a, b], axis=-1), kernel)[..., 0]
    np.testing.assert_allclose(shifted, expected, atol=1e-5)
    # Other shapes keep the plain convolution.
    assert head_taps(rng.normal(0, 1, (3, 3, 5, 2)).astype(np.float32), (3, 2)) is None
    assert head_taps(rng.normal(0, 1, (5, 5, 5, 1)).astype(np.float32), (3, 2)) is None
    assert head_taps(kernel, (3, 3)) is None


def test_the_fused_head_matches_a_trained_drl_head_at_the_image_border(
    untrained_weights: Path,
) -> None:
    """Non-zero head weights (the untrained one is zero) through the tap-form head."""
    rng = np.random.default_rng(3)
    net = build_drl()
    head = net.get_layer("conv7")
    kernel, bias = head.get_weights()
    head.set_weights(
        [
            rng.uniform(-0.1, 0.1, kernel.shape).astype(np.float32),
            np.full_like(bias, 0.01),
        ]
    )
    fn = compile_cascade(net, build_drl(residual=False))
    assert fn is not None
    x = rng.uniform(0.2, 0.4, (1, 17, 23, 1)).astype(np.float32)
    expected = np.asarray(net.predict_on_batch(x))
    got = fn(x)
    # Every border row and column included: the taps' zero padding is 'same' padding.
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert float(np.abs(expected - x).max()) > 0.01  # the head did change the image


def test_batch_buckets_are_the_next_power_of_two() -> None:
    """Under JAX the compiled graph is specialised to its batch size; batches run as the
    next power of two, so a series' last batch reuses a compiled shape."""
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 63, 64, 65)] == [
        1, 2, 4, 4, 8, 8, 16, 64, 64, 128
    ]  # fmt: skip
    with pytest.raises(ValueError, match="count"):
        batch_bucket(0)
    assert shape_specialised("jax") and not shape_specialised("tensorflow")


def test_batches_of_a_shape_specialised_engine_are_powers_of_two(untrained_weights: Path) -> None:
    """Each call of such an engine is a power of two up to ``batch_size``, so the last,
    padded batch of a series never holds more slices than the memory plan allowed."""
    cascade = Cascade.load(untrained_weights, batch_size=6)
    assert not cascade._batches_in_powers_of_two  # TensorFlow: traced once for all shapes
    hu = np.zeros((7, 32, 32), np.float32)
    calls: list[int] = []
    plain = cascade.denoise(hu, progress=calls.append)
    assert calls == [6, 1]
    cascade._batches_in_powers_of_two = True  # as under KERAS_BACKEND=jax
    calls = []
    rounded = cascade.denoise(hu, progress=calls.append)
    assert calls == [4, 3]  # the 3 run padded to 4 by the JAX engine
    # The same to float rounding: oneDNN (on by itself on AVX-512 VNNI/BF16 CPUs) picks
    # its kernels by batch size, 2.4e-3 HU apart at 1,000 HU (AVX-512 EPYC); the
    # output is stored in whole HU.
    np.testing.assert_allclose(rounded, plain, rtol=1e-5, atol=0.01)
