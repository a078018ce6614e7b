"""Runs the cascade over a series and writes the derived series.

:func:`denoise_series` is the one pipeline both the node's worker and the offline
``ldct-node denoise`` use: decode -> HU -> cascade -> one derived series per output
profile, written durably.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from ldct_node.config import DicomSettings, OutputProfile
from ldct_node.derive import derive_instance, derived_series_uid, write_derived
from ldct_node.dicomio import decode_hu
from ldct_node.model.cascade import Cascade, blend_with_input

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DerivedSeries:
    """One written derived series."""

    profile: str
    series_uid: str
    directory: Path
    paths: list[Path]


def denoise_series(
    datasets: Sequence[Dataset],
    cascade: Cascade,
    profiles: Sequence[OutputProfile],
    dicom: DicomSettings,
    output_root: Path,
    *,
    progress: Callable[[int], None] | None = None,
) -> list[DerivedSeries]:
    """Denoise the instances of one source series and write its derived series.

    Parameters
    ----------
    datasets
        Full datasets (with pixel data) of one series, in slice order.
    cascade
        The loaded networks.
    profiles
        One derived series is written per profile (blend, description, number).
    dicom
        UID root and image comments for the derived instances.
    output_root
        Each derived series goes to ``output_root/<derived SeriesInstanceUID>/``.
    progress
        Called with the number of slices denoised after each batch.

    Raises
    ------
    ldct_node.dicomio.InputError
        When a slice cannot be decoded; nothing is written for the series then.
    """
    if not datasets:
        raise ValueError("datasets is empty: a series needs at least one instance")
    if not profiles:
        raise ValueError("profiles is empty: at least one output profile is needed")
    hu = [decode_hu(ds) for ds in datasets]
    denoised: list[np.ndarray] = [np.empty(0, np.float32)] * len(hu)
    # Slices of one series nearly always share one size; batch per size when they do not.
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(hu):
        by_shape.setdefault(image.shape, []).append(i)
    for indices in by_shape.values():
        result = cascade.denoise(np.stack([hu[i] for i in indices]), progress=progress)
        for i, image in zip(indices, result, strict=True):
            denoised[i] = image

    written: list[DerivedSeries] = []
    source_series = str(datasets[0].SeriesInstanceUID)
    for profile in profiles:
        series_uid = derived_series_uid(
            source_series, cascade.model_version, profile.name, dicom.uid_root
        )
        directory = output_root / series_uid
        directory.mkdir(parents=True, exist_ok=True)
        paths = [
            write_derived(
                derive_instance(
                    ds,
                    blend_with_input(out, src, profile.blend),
                    profile=profile,
                    model_version=cascade.model_version,
                    dicom=dicom,
                ),
                directory,
            )
            for ds, src, out in zip(datasets, hu, denoised, strict=True)
        ]
        written.append(DerivedSeries(profile.name, series_uid, directory, paths))
        logger.info(
            "wrote derived series (%s, %d instances) to %s", profile.name, len(paths), directory
        )
    return written
