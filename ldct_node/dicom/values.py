"""DICOM attribute values as the node reads them: multi-valued strings, frame counts
and rescale pairs, with one error type (:class:`InputError`) for values that cannot be
used."""

from __future__ import annotations

import math

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence


class InputError(ValueError):
    """An input instance whose pixel data cannot be used (corrupt, undecodable, wrong size)."""


def strings(value: object) -> list[str]:
    """The value(s) of a string attribute as a list: none for absent or empty, one for a
    single value, each item for a multi-valued one (anything else as its text)."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    try:
        return [str(v) for v in value]  # type: ignore[attr-defined]
    except TypeError:
        return [str(value)]


def n_frames(ds: Dataset) -> int:
    """NumberOfFrames of ``ds`` (1 when absent or unreadable)."""
    try:
        return max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        return 1


def rescale_pair(slope: object, intercept: object, where: str = "") -> tuple[float, float]:
    """(slope, intercept) from RescaleSlope/RescaleIntercept values; absent or empty mean 1
    and 0.

    Raises
    ------
    InputError
        A value that is no number, a slope of zero or a value that is not finite; the
        message starts with ``where`` (e.g. ``"frame 3: "``).
    """
    try:
        slope_f = 1.0 if slope is None or slope == "" else float(slope)  # type: ignore[arg-type]
        intercept_f = (
            0.0 if intercept is None or intercept == "" else float(intercept)  # type: ignore[arg-type]
        )
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}unreadable rescale ({exc})") from exc
    if slope_f == 0.0 or not math.isfinite(slope_f) or not math.isfinite(intercept_f):
        raise InputError(f"{where}unusable rescale: slope {slope_f}, intercept {intercept_f}")
    return slope_f, intercept_f


def put_series_item(ds: Dataset, keyword: str, item: Dataset) -> None:
    """Set the sequence ``keyword`` of ``ds`` to its items of other series followed by
    ``item`` (which replaces any item of its own SeriesInstanceUID)."""
    uid = item.SeriesInstanceUID
    others = [i for i in ds.get(keyword, None) or [] if i.get("SeriesInstanceUID") != uid]
    setattr(ds, keyword, Sequence([*others, item]))
