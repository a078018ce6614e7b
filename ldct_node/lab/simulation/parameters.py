"""What a simulated data set is made of: :class:`SimulationParameters`."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ldct_node.lab.simulation.phantoms import PHANTOM_KINDS
from ldct_node.lab.simulation.projector import DEFAULT_FILTER, FILTERS, GEOMETRIES
from ldct_node.lab.simulation.scan import check_dose_args

logger = logging.getLogger(__name__)


def positive_int(value: object) -> bool:
    """Whether ``value`` is an int >= 1 (a bool is not)."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


@dataclass(frozen=True)
class SimulationParameters:
    """Everything that decides the data :func:`~ldct_node.lab.simulation.simulate_dataset`
    writes: the same parameters write the same pixels and UIDs (``simulation.json``
    records them). How the work is run (worker processes, progress) is not part of it.

    Validated on construction: a value out of range raises ValueError naming the field.
    ``source_series`` is kept as a tuple of paths, ``slice_range`` as a tuple.
    """

    #: Phantom patients to simulate; with ``source_series``, the most series to use.
    n_cases: int
    #: Slices per phantom case (``slice_thickness_mm`` apart; default 8); with
    #: ``source_series``, the most slices taken from the middle of each series (or of
    #: ``slice_range``; default 8, or the whole range when one is given).
    slices_per_case: int | None = None
    #: Phantom image size (>= 16). Source images keep their own size unless
    #: ``resample_sources`` or ``pixel_size_mm``.
    size: int = 256
    #: Low-dose count relative to full dose, in (0, 1].
    dose_fraction: float = 0.25
    #: Full-dose incident photons per ray and view; default
    #: :func:`~ldct_node.lab.simulation.scan.default_i0` of the image size (clinical
    #: noise levels at any size). The value used is recorded per case in
    #: simulation.json, as is the electronic noise.
    i0: float | None = None
    #: Electronic noise std in counts; default
    #: :func:`~ldct_node.lab.simulation.scan.default_electronic_noise` of the size.
    electronic_noise: float | None = None
    #: Seeds the anatomy (per case) and the noise (per slice); >= 0.
    seed: int = 0
    #: Views (see :func:`~ldct_node.lab.simulation.scan.simulate_scan`); >= 4, even for
    #: fan beam; default from the image size.
    n_angles: int | None = None
    #: ``"parallel"`` or ``"fan"`` (equiangular, rebinned to parallel before FBP).
    geometry: str = "parallel"
    #: FBP ramp window, one of :data:`~ldct_node.lab.simulation.projector.FILTERS`.
    filter_name: str = DEFAULT_FILTER
    #: Slice spacing (mm) of phantom cases.
    slice_thickness_mm: float = 3.0
    #: ``"body"``, ``"water"`` or ``"qa"`` (see
    #: :func:`~ldct_node.lab.simulation.phantoms.make_phantom`).
    phantom_kind: str = "body"
    #: Folders (or files) of normal-dose CT series to use as truth instead of phantoms;
    #: every CT series found is one case. Their noise is kept: the accepted practice.
    source_series: tuple[Path, ...] = ()
    #: Resample source images to ``size`` x ``size`` (after padding to square).
    resample_sources: bool = False
    #: Resample source images to this pixel size (mm) and centre them on a ``size`` x
    #: ``size`` canvas (air around, or a central crop): clinical sampling such as
    #: 0.5-0.8 mm at 512 x 512 from any source.
    pixel_size_mm: float | None = None
    #: ``(first, last)``, 1-based and inclusive, in slice-position order: the block of
    #: each source series to use (training and held-out blocks of one series).
    slice_range: tuple[int, int] | None = None
    #: Take every ``slice_step``-th slice of the series (or of ``slice_range``).
    slice_step: int = 1
    #: Also write the FBP of the noiseless sinogram of each slice (``truth_recon``).
    write_truth_recon: bool = False

    def __post_init__(self) -> None:
        self._validate()
        # Any sequence of paths or strings (or None) is taken; kept as a tuple of paths.
        object.__setattr__(self, "source_series", tuple(Path(s) for s in self.source_series or ()))
        if self.slice_range is not None:
            object.__setattr__(self, "slice_range", tuple(self.slice_range))

    def _validate(self) -> None:
        counts: list[tuple[str, object]] = [
            ("n_cases", self.n_cases),
            ("slice_step", self.slice_step),
        ]
        if self.slices_per_case is not None:
            counts.append(("slices_per_case", self.slices_per_case))
        for name, value in counts:
            if not positive_int(value):
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        slice_range = self.slice_range
        if slice_range is not None and (
            len(slice_range) != 2 or not 1 <= slice_range[0] <= slice_range[1]
        ):
            raise ValueError(
                f"slice_range: must be (first, last) with 1 <= first <= last, got {slice_range!r}"
            )
        pixel = self.pixel_size_mm
        if pixel is not None and not (math.isfinite(pixel) and pixel > 0):
            raise ValueError(f"pixel_size_mm: must be > 0, got {pixel!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 16:
            raise ValueError(f"size: must be an integer >= 16, got {self.size!r}")
        check_dose_args(self.dose_fraction, self.i0, self.electronic_noise)
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry: must be one of {GEOMETRIES}, got {self.geometry!r}")
        if self.filter_name not in FILTERS:
            raise ValueError(f"filter_name: must be one of {FILTERS}, got {self.filter_name!r}")
        n_angles = self.n_angles
        if n_angles is not None and (n_angles < 4 or (self.geometry == "fan" and n_angles % 2)):
            raise ValueError(f"n_angles: must be >= 4 (and even for fan beam), got {n_angles}")
        if not self.slice_thickness_mm > 0:
            raise ValueError(f"slice_thickness_mm: must be > 0, got {self.slice_thickness_mm}")
        if self.phantom_kind not in PHANTOM_KINDS:
            raise ValueError(
                f"phantom_kind: must be one of {PHANTOM_KINDS}, got {self.phantom_kind!r}"
            )
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed: must be a non-negative integer, got {seed!r}")
        if not self.source_series and (
            pixel is not None or slice_range is not None or self.slice_step > 1
        ):
            raise ValueError(
                "pixel_size_mm, slice_range, slice_step: only for source_series (phantoms are "
                "sampled by size)"
            )
