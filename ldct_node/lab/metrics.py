"""Image-quality metrics on HU images: PSNR, SSIM, RMSE, noise, CNR, CT-number bias
and MTF. :mod:`ldct_node.lab.evaluation` applies them to held-out series and writes
the report (``ldct-node evaluate``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Soft tissue in the noiseless truth: where "noise" means the image minus the truth.
SOFT_TISSUE_HU = (-150.0, 150.0)


def rmse(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Root-mean-square difference (HU), optionally inside ``mask``."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if mask is not None:
        diff = diff[mask]
    if diff.size == 0:
        raise ValueError("mask selects no pixels")
    return float(np.sqrt(np.mean(diff**2)))


def noise_std(image: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Standard deviation of ``image - truth`` inside ``mask`` (HU)."""
    diff = (np.asarray(image, np.float64) - np.asarray(truth, np.float64))[mask]
    if diff.size == 0:
        raise ValueError("mask selects no pixels")
    return float(np.std(diff))


# ======================================================================================
# Image-quality metrics (each on HU images; masks select where they are measured)
# ======================================================================================

#: Soft-tissue display window (W 400, L 40): PSNR and SSIM are computed in it, as a
#: reader sees the image, so a method is not rewarded for bone or air it leaves alone.
SOFT_TISSUE_WINDOW = (-160.0, 240.0)


def _check_same_shape(**arrays: np.ndarray) -> None:
    shapes = {name: np.shape(a) for name, a in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes differ: {shapes}")


def psnr(
    image: np.ndarray,
    reference: np.ndarray,
    *,
    data_range: float,
    mask: np.ndarray | None = None,
) -> float:
    """Peak signal-to-noise ratio (dB): ``20 log10(data_range / RMSE)``.

    Infinite when the images are equal.
    """
    _check_same_shape(image=image, reference=reference)
    if not data_range > 0:
        raise ValueError(f"data_range: must be > 0, got {data_range}")
    error = rmse(image, reference, mask)
    return float("inf") if error == 0 else float(20.0 * np.log10(data_range / error))


def ssim(
    image: np.ndarray,
    reference: np.ndarray,
    *,
    data_range: float,
    sigma: float = 1.5,
    mask: np.ndarray | None = None,
) -> float:
    """Mean structural similarity of two 2-D images (Wang et al. 2004).

    scikit-image's ``structural_similarity`` (Gaussian window of ``sigma`` pixels
    truncated at 3.5 sigma, population covariances, K1 = 0.01 and K2 = 0.03); its SSIM
    map is averaged over ``mask`` (default: the pixels whose whole window lies inside
    the image, as scikit-image does). A stack ``(N, H, W)`` gives the mean over slices.
    """
    from skimage.metrics import structural_similarity

    _check_same_shape(image=image, reference=reference)
    x = np.asarray(image, np.float64)
    y = np.asarray(reference, np.float64)
    if x.ndim == 3:
        masks = [None] * len(x) if mask is None else list(mask)
        return float(
            np.mean(
                [
                    ssim(a, b, data_range=data_range, sigma=sigma, mask=m)
                    for a, b, m in zip(x, y, masks, strict=True)
                ]
            )
        )
    if x.ndim != 2:
        raise ValueError(f"image: expected (H, W) or (N, H, W), got shape {x.shape}")
    if not data_range > 0:
        raise ValueError(f"data_range: must be > 0, got {data_range}")
    pad = int(3.5 * sigma + 0.5)
    if mask is None and min(x.shape) <= 2 * pad:
        raise ValueError(f"image: {x.shape} is too small for a window of sigma {sigma}")
    _, ssim_map = structural_similarity(
        x,
        y,
        data_range=data_range,
        gaussian_weights=True,
        sigma=sigma,
        use_sample_covariance=False,
        full=True,
    )
    if mask is None:
        return float(ssim_map[pad:-pad, pad:-pad].mean())
    selected = ssim_map[np.asarray(mask, bool)]
    if selected.size == 0:
        raise ValueError("mask selects no pixels")
    return float(selected.mean())


def in_window(image: np.ndarray, window: tuple[float, float] = SOFT_TISSUE_WINDOW) -> np.ndarray:
    """The image clipped to a display window (lower, upper) in HU."""
    lower, upper = window
    if not upper > lower:
        raise ValueError(f"window: upper must exceed lower, got {window}")
    return np.clip(np.asarray(image, np.float64), lower, upper)


def roi_mean(image: np.ndarray, mask: np.ndarray) -> float:
    values = np.asarray(image, np.float64)[mask]
    if values.size == 0:
        raise ValueError("mask selects no pixels")
    return float(values.mean())


def roi_std(image: np.ndarray, mask: np.ndarray) -> float:
    """Standard deviation of the pixels in ``mask``: noise where the object is uniform."""
    values = np.asarray(image, np.float64)[mask]
    if values.size < 2:
        raise ValueError("mask selects fewer than 2 pixels")
    return float(values.std())


def cnr(image: np.ndarray, signal: np.ndarray, background: np.ndarray) -> float:
    """Contrast-to-noise ratio ``|mean(signal) - mean(background)| / std(background)``."""
    noise = roi_std(image, background)
    if noise == 0:
        raise ValueError("background has no noise: CNR is undefined")
    return abs(roi_mean(image, signal) - roi_mean(image, background)) / noise


def hu_bias(image: np.ndarray, mask: np.ndarray, nominal_hu: float) -> float:
    """Mean CT number in ``mask`` minus its nominal (true) value, in HU."""
    return roi_mean(image, mask) - float(nominal_hu)


def disc_mask(shape: tuple[int, ...], row: float, col: float, radius: float) -> np.ndarray:
    """Pixels whose centre lies within ``radius`` of (row, col); broadcast over a stack."""
    rows, cols = shape[-2:]
    yy, xx = np.ogrid[:rows, :cols]
    disc = np.hypot(yy - row, xx - col) < radius
    return np.broadcast_to(disc, shape).copy()


def annulus_mask(
    shape: tuple[int, ...], row: float, col: float, inner: float, outer: float
) -> np.ndarray:
    """Pixels between ``inner`` and ``outer`` radius of (row, col)."""
    return disc_mask(shape, row, col, outer) & ~disc_mask(shape, row, col, inner)


@dataclass(frozen=True)
class MTF:
    """A modulation transfer function measured from an edge."""

    #: Spatial frequency, cycles per pixel.
    frequency: np.ndarray
    mtf: np.ndarray
    #: Frequency (cycles per pixel) where the MTF first falls to 0.5.
    mtf50: float

    def mtf50_per_mm(self, pixel_spacing_mm: float) -> float:
        return self.mtf50 / pixel_spacing_mm


def mtf50(frequency: np.ndarray, mtf: np.ndarray) -> float:
    """First frequency where ``mtf`` falls to 0.5 (linear interpolation); NaN if never."""
    below = np.flatnonzero(np.asarray(mtf) < 0.5)
    if below.size == 0 or below[0] == 0:
        return float("nan")
    i = int(below[0])
    f0, f1, m0, m1 = frequency[i - 1], frequency[i], mtf[i - 1], mtf[i]
    return float(f0 + (m0 - 0.5) * (f1 - f0) / (m0 - m1))


def edge_mtf(
    images: np.ndarray,
    row: float,
    col: float,
    radius_px: float,
    *,
    half_width_px: float | None = None,
    bin_px: float = 0.1,
) -> MTF:
    """MTF from the circular edge of a rod (the circular-edge method of TG-233).

    Every pixel within ``half_width_px`` of the edge gives a sample of the edge spread
    function at its distance from the rod's edge; a circle crosses the pixel grid at
    every sub-pixel phase, so binning those samples by distance (``bin_px`` wide)
    gives an over-sampled ESF without a slanted edge. Its derivative (the line spread
    function, its tails tapered by a Tukey window against noise) Fourier-transforms to
    the MTF. All slices of a stack ``(N, H, W)`` are pooled (the rod stays in place).

    Parameters
    ----------
    images
        (H, W) or (N, H, W) HU images of the rod.
    row, col, radius_px
        The rod's centre and radius in pixels.
    half_width_px
        Half the width of the band around the edge that is sampled; default
        ``min(0.8 radius, 12)`` pixels.
    bin_px
        ESF bin width in pixels (the over-sampling).
    """
    from scipy.signal.windows import tukey

    stack = np.asarray(images, np.float64)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3:
        raise ValueError(f"images: expected (H, W) or (N, H, W), got shape {stack.shape}")
    if not radius_px > 2:
        raise ValueError(f"radius_px: must be > 2 pixels, got {radius_px}")
    if not 0 < bin_px <= 0.5:
        raise ValueError(f"bin_px: must be in (0, 0.5], got {bin_px}")
    half = min(0.8 * radius_px, 12.0) if half_width_px is None else float(half_width_px)
    if not 1.0 < half < radius_px:
        raise ValueError(f"half_width_px: must be in (1, radius_px), got {half}")
    rows, cols = stack.shape[1:]
    yy, xx = np.ogrid[:rows, :cols]
    distance = np.hypot(yy - row, xx - col) - radius_px
    band = np.abs(distance) <= half
    if band.sum() < 50:
        raise ValueError("the edge is (mostly) outside the image")
    values = stack[:, band].ravel()
    d = np.tile(distance[band], len(stack))
    n_bins = round(2 * half / bin_px)
    index = np.clip(((d + half) / bin_px).astype(int), 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    sums = np.bincount(index, weights=values, minlength=n_bins)
    centres = -half + (np.arange(n_bins) + 0.5) * bin_px
    filled = counts > 0
    esf = np.interp(centres, centres[filled], sums[filled] / counts[filled])
    lsf = np.gradient(esf, bin_px)
    if lsf.sum() < 0:  # a rod brighter than its background: ESF falls across the edge
        lsf = -lsf
    lsf *= tukey(n_bins, alpha=0.5)
    n_fft = max(4096, 1 << int(np.ceil(np.log2(n_bins))))
    spectrum = np.abs(np.fft.rfft(lsf, n_fft))
    if spectrum[0] <= 0:
        raise ValueError("no edge found (flat or noise-only profile)")
    frequency = np.fft.rfftfreq(n_fft, d=bin_px)
    keep = frequency <= 1.0  # beyond 1 cycle/pixel is meaningless for pixel data
    mtf = spectrum[keep] / spectrum[0]
    return MTF(frequency=frequency[keep], mtf=mtf, mtf50=mtf50(frequency[keep], mtf))
