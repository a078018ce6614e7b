"""CT-number fidelity step (output profiles' hu_fidelity_mm)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from ldct_node.model.fidelity import restore_low_frequency


def _scene(rng: np.random.Generator, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A water disc with a bone ring and a +40 HU insert: truth and a noisy scan."""
    yy, xx = np.mgrid[:size, :size] - size / 2
    r = np.hypot(yy, xx)
    truth = np.where(r < 0.45 * size, 0.0, -1000.0)
    truth[(r > 0.38 * size) & (r < 0.45 * size)] = 1000.0
    truth[np.hypot(yy - 10, xx - 10) < 14] = 40.0
    noise = ndimage.gaussian_filter(rng.normal(0, 30.0, truth.shape), 0.7)
    return truth, truth + noise


def test_a_shift_of_the_network_is_undone_and_noise_stays_low() -> None:
    truth, noisy = _scene(np.random.default_rng(0))
    # A "network" that denoises perfectly but moves the insert by -12 HU and the
    # water by +5 HU: a low-frequency CT-number drift.
    denoised = truth.copy()
    denoised[(truth > -100) & (truth < 100)] += 5.0
    denoised[truth == 40.0] -= 12.0
    fixed = restore_low_frequency(denoised, noisy, pixel_spacing_mm=0.5, fidelity_mm=1.5)
    insert = ndimage.binary_erosion(truth == 40.0, iterations=3)
    water = ndimage.binary_erosion(truth == 0.0, iterations=10)
    assert abs(float(np.mean(denoised[insert] - truth[insert]))) == pytest.approx(7.0, abs=0.5)
    assert abs(float(np.mean(fixed[insert] - truth[insert]))) < 2.0
    assert abs(float(np.mean(fixed[water] - truth[water]))) < 1.0
    # Noise put back is a fraction of the input's (sigma 3 px).
    assert np.std((fixed - truth)[water]) < 0.25 * np.std((noisy - truth)[water])


def test_edges_are_not_spread_into_halos() -> None:
    """An output that differs from the input only at the bone edge (here: the bone's
    inner layer eroded to water, 1000 HU off) must not get that difference smeared over
    millimetres of the neighbouring tissue."""
    truth, _ = _scene(np.random.default_rng(1))
    noisy = truth + np.random.default_rng(2).normal(0, 10.0, truth.shape)
    bone = truth == 1000.0
    inner = bone & ~ndimage.binary_erosion(bone) & ndimage.binary_dilation(truth == 0.0)
    denoised = np.where(inner, 0.0, truth)
    fixed = restore_low_frequency(denoised, noisy, pixel_spacing_mm=0.5, fidelity_mm=2.0)
    near = ndimage.binary_dilation(inner, iterations=6) & (truth == 0.0)
    spread = float(np.max(np.abs(fixed - denoised)[near]))
    naive = denoised + ndimage.gaussian_filter(noisy - denoised, 4.0)
    assert spread < 5.0
    assert float(np.max(np.abs(naive - denoised)[near])) > 50.0


def test_zero_width_is_the_identity_and_stacks_are_per_slice() -> None:
    truth, noisy = _scene(np.random.default_rng(3), size=64)
    den = truth.astype(np.float32)
    np.testing.assert_array_equal(restore_low_frequency(den, noisy, 0.7, 0.0), den)
    stack = np.stack([den, den + 20.0 * (truth > -500)])
    src = np.stack([noisy, noisy])
    out = restore_low_frequency(stack, src, 0.7, 3.0)
    np.testing.assert_allclose(out[0], restore_low_frequency(den, noisy, 0.7, 3.0), atol=1e-4)
    body = ndimage.binary_erosion(truth == 0.0, iterations=8)
    assert abs(float(np.mean(out[1][body] - out[0][body]))) < 2.0  # the +20 HU shift undone


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"fidelity_mm": -1.0}, "fidelity_mm"),
        ({"pixel_spacing_mm": 0.0}, "pixel_spacing_mm"),
        ({"edge_factor": 0.0}, "edge_factor"),
    ],
)
def test_arguments_are_checked(kwargs: dict[str, float], argument: str) -> None:
    args = {"pixel_spacing_mm": 1.0, "fidelity_mm": 1.0, **kwargs}
    with pytest.raises(ValueError, match=argument):
        restore_low_frequency(np.zeros((8, 8)), np.zeros((8, 8)), **args)
    with pytest.raises(ValueError, match="source"):
        restore_low_frequency(np.zeros((8, 8)), np.zeros((8, 9)), 1.0, 1.0)


def test_output_profile_applies_fidelity_then_blend(tmp_path: Path) -> None:
    """What the worker (and `denoise`) derives per profile: the fidelity step uses the
    instance's PixelSpacing, names itself in DerivationDescription, and needs geometry."""
    from _dicom_util import make_ct_series

    from ldct_node.config import DicomSettings, OutputProfile
    from ldct_node.dicom.derive import derive_instance
    from ldct_node.dicom.io import InputError, decode_hu
    from ldct_node.pipeline import profile_image

    ds = pydicom.dcmread(make_ct_series(tmp_path, n=1, size=64, pixel_spacing_mm=0.8)[0])
    hu = decode_hu(ds)
    body = ndimage.binary_erosion(hu > -500, iterations=6)
    denoised = np.where(hu > -500, ndimage.gaussian_filter(hu, 2.0) + 15.0, hu)
    plain = OutputProfile(hu_fidelity_mm=0.0)
    kept = OutputProfile(name="kept", hu_fidelity_mm=2.4, blend=0.5)
    np.testing.assert_array_equal(profile_image(ds, hu, denoised, plain), denoised)
    out = profile_image(ds, hu, denoised, kept)
    fidelity = restore_low_frequency(denoised, hu, 0.8, 2.4)
    np.testing.assert_allclose(out, 0.5 * fidelity + 0.5 * hu, atol=1e-3)
    assert abs(float(np.mean((fidelity - hu)[body]))) < 3.0  # the +15 HU shift undone
    derived = derive_instance(ds, out, profile=kept, model_version="m1", dicom=DicomSettings())
    assert "CT numbers kept on the input's above 2.4 mm" in derived.DerivationDescription
    del ds.PixelSpacing
    with pytest.raises(InputError, match="no usable PixelSpacing"):
        profile_image(ds, hu, denoised, kept)


def test_a_garbage_pixel_spacing_cannot_stall_the_step() -> None:
    """PixelSpacing 1e-6 mm would mean sigma = 2e6 px: capped, the slice still runs
    (a fuzzed header must not hold the worker for minutes) and shifts are still undone."""
    truth, noisy = _scene(np.random.default_rng(4), size=256)
    out = restore_low_frequency(truth + 10.0, noisy, pixel_spacing_mm=1e-6, fidelity_mm=2.0)
    body = ndimage.binary_erosion(truth == 0.0, iterations=10)
    assert abs(float(np.mean((out - truth)[body]))) < 10.0
