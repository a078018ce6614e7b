"""Image-quality metrics on synthetic images whose answers are known analytically."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import erfc
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ldct_node.lab.metrics import (
    annulus_mask,
    cnr,
    disc_mask,
    edge_mtf,
    hu_bias,
    in_window,
    mtf50,
    psnr,
    roi_std,
    ssim,
)


def _blurred_disc(
    sigma: float, radius: float = 30.0, size: int = 96, contrast: float = 1000.0
) -> tuple[np.ndarray, float, float]:
    """A disc of ``contrast`` HU whose edge is blurred by a Gaussian of ``sigma`` pixels."""
    row, col = size / 2 - 0.3, size / 2 + 0.45
    yy, xx = np.indices((size, size))
    r = np.hypot(yy - row, xx - col)
    return contrast * 0.5 * erfc((r - radius) / (math.sqrt(2.0) * sigma)), row, col


def _gaussian_mtf50(sigma: float) -> float:
    # MTF(f) = exp(-2 pi^2 sigma^2 f^2) = 0.5
    return math.sqrt(math.log(2.0) / 2.0) / (math.pi * sigma)


@pytest.mark.parametrize("sigma", [0.8, 1.5, 2.5])
def test_mtf50_of_a_gaussian_blurred_edge_is_the_analytic_value(sigma: float) -> None:
    image, row, col = _blurred_disc(sigma)
    result = edge_mtf(image, row, col, 30.0)
    assert result.mtf50 == pytest.approx(_gaussian_mtf50(sigma), rel=0.03)
    assert result.mtf[0] == pytest.approx(1.0)
    # The measured curve follows the Gaussian MTF, not just at 50 %.
    expected = np.exp(-2 * (math.pi * sigma * result.frequency) ** 2)
    low = result.frequency < 1.5 * _gaussian_mtf50(sigma)
    assert np.max(np.abs(result.mtf[low] - expected[low])) < 0.03
    assert result.mtf50_per_mm(0.5) == pytest.approx(result.mtf50 / 0.5)


def test_mtf50_survives_noise_and_polarity() -> None:
    image, row, col = _blurred_disc(1.5)
    rng = np.random.default_rng(0)
    noisy = image + rng.normal(0.0, 25.0, (4, *image.shape))
    assert edge_mtf(noisy, row, col, 30.0).mtf50 == pytest.approx(_gaussian_mtf50(1.5), rel=0.05)
    # A dark rod in a bright background (the air insert) gives the same MTF.
    assert edge_mtf(-image, row, col, 30.0).mtf50 == pytest.approx(_gaussian_mtf50(1.5), rel=0.03)
    # A sharper edge has the higher MTF50.
    sharp, _, _ = _blurred_disc(0.8)
    assert edge_mtf(sharp, row, col, 30.0).mtf50 > edge_mtf(image, row, col, 30.0).mtf50


def test_edge_mtf_checks_its_arguments() -> None:
    image, row, col = _blurred_disc(1.0)
    with pytest.raises(ValueError, match="radius_px"):
        edge_mtf(image, row, col, 1.5)
    with pytest.raises(ValueError, match="half_width_px"):
        edge_mtf(image, row, col, 30.0, half_width_px=40.0)
    with pytest.raises(ValueError, match="outside"):
        edge_mtf(image, 500.0, 500.0, 10.0)
    with pytest.raises(ValueError, match="images"):
        edge_mtf(image[0], row, col, 30.0)


def test_mtf50_interpolates_and_reports_never() -> None:
    f = np.linspace(0.0, 1.0, 11)
    assert mtf50(f, 1.0 - f) == pytest.approx(0.5)
    assert mtf50(f, 1.0 - 0.4 * f) != mtf50(f, 1.0 - 0.4 * f)  # never below 0.5: NaN


def test_noise_and_cnr_of_known_noise() -> None:
    rng = np.random.default_rng(1)
    shape = (4, 128, 128)
    image = rng.normal(0.0, 10.0, shape)
    signal = disc_mask(shape, 64, 64, 20)
    image[signal] += 10.0  # a 1 % disc: CNR 1 at 10 HU noise
    background = annulus_mask(shape, 64, 64, 25, 60)
    assert roi_std(image, background) == pytest.approx(10.0, rel=0.02)
    assert cnr(image, signal, background) == pytest.approx(1.0, abs=0.05)
    # Halving the noise doubles the CNR.
    quieter = image.copy()
    quieter[~signal] *= 0.5
    quieter[signal] = 10.0 + 0.5 * (image[signal] - 10.0)
    assert cnr(quieter, signal, background) == pytest.approx(2.0, abs=0.1)
    with pytest.raises(ValueError, match="no noise"):
        cnr(np.zeros(shape), signal, background)


def test_hu_bias_and_masks() -> None:
    image = np.full((32, 32), 118.0)
    roi = disc_mask(image.shape, 16, 16, 5)
    assert hu_bias(image, roi, 120.0) == pytest.approx(-2.0)
    assert roi.sum() == np.sum(np.hypot(*np.indices((32, 32)) - 16.0) < 5)
    ring = annulus_mask((32, 32), 16, 16, 5, 8)
    assert not np.any(ring & roi)
    with pytest.raises(ValueError, match="no pixels"):
        hu_bias(image, np.zeros_like(roi), 0.0)


def test_psnr_and_ssim_match_scikit_image() -> None:
    rng = np.random.default_rng(2)
    reference = rng.normal(40.0, 60.0, (64, 64))
    image = reference + rng.normal(0.0, 20.0, reference.shape)
    window = (-160.0, 240.0)
    a, b = in_window(image, window), in_window(reference, window)
    assert psnr(a, b, data_range=400.0) == pytest.approx(
        peak_signal_noise_ratio(b, a, data_range=400.0)
    )
    assert ssim(a, b, data_range=400.0) == pytest.approx(
        structural_similarity(
            a, b, data_range=400.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        ),
        abs=1e-9,
    )


def test_psnr_and_ssim_properties() -> None:
    rng = np.random.default_rng(3)
    reference = rng.normal(0.0, 50.0, (2, 48, 48))
    less = reference + rng.normal(0.0, 5.0, reference.shape)
    more = reference + rng.normal(0.0, 30.0, reference.shape)
    assert psnr(reference, reference, data_range=400.0) == math.inf
    assert ssim(reference, reference, data_range=400.0) == pytest.approx(1.0)
    assert psnr(less, reference, data_range=400.0) > psnr(more, reference, data_range=400.0)
    assert ssim(less, reference, data_range=400.0) > ssim(more, reference, data_range=400.0)
    # Symmetric, and 20 dB per decade of error.
    assert ssim(less, reference, data_range=400.0) == pytest.approx(
        ssim(reference, less, data_range=400.0)
    )
    assert psnr(reference + 4.0, reference, data_range=400.0) == pytest.approx(40.0)
    assert psnr(reference + 40.0, reference, data_range=400.0) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="data_range"):
        psnr(less, reference, data_range=0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(less[0], reference, data_range=400.0)
