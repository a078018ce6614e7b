"""Enhanced CT (multi-frame) instances: per-frame HU and the derived Enhanced CT.

An Enhanced CT Image Storage instance (1.2.840.10008.5.1.4.1.1.2.1) holds a whole stack
as frames, each with its own functional groups (position, rescale, frame type...). The
node denoises it frame by frame and writes the result back as **one Enhanced CT
instance** (same SOP class, same frames in the same order), not as classic CT slices:

* the IOD stays the one the modality chose, so every frame keeps its functional groups
  (geometry, per-frame rescale, acquisition and reconstruction details) exactly, with
  nothing to translate into single-frame attributes and nothing lost in the translation;
* a PACS that stored the source accepts the output (same SOP class, one instance);
* one source instance maps to one derived instance, so the deterministic UIDs, the
  loop guard and the DB's per-instance bookkeeping work unchanged.

What changes in the derived instance, beyond what :func:`ldct_node.dicom.derive.derive_instance`
does for every instance: ImageType and each FrameType become ``DERIVED`` with the
derived pixel contrast ``FILTERED`` (value 2 stays ``PRIMARY``: the Enhanced CT IOD allows
nothing else there), each frame gets a Derivation Image functional group that references
its source frame, and the Common Instance Reference module lists the source instance.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from ldct_node.dicom.io import _ensure_transfer_syntax, stored_range
from ldct_node.dicom.pixels import slice_shape
from ldct_node.dicom.values import InputError, n_frames, put_series_item, rescale_pair, strings

logger = logging.getLogger(__name__)

#: ImageType / FrameType value 4 (Derived Pixel Contrast) of the derived frames.
DERIVED_PIXEL_CONTRAST = "FILTERED"


def is_multiframe(ds: Dataset) -> bool:
    return n_frames(ds) > 1


def _group_item(groups: Dataset | None, keyword: str) -> Dataset | None:
    """The first item of functional group ``keyword`` in one functional groups item."""
    if groups is None:
        return None
    seq = groups.get(keyword)
    return seq[0] if seq else None


def _frame_groups(ds: Dataset) -> tuple[Dataset | None, list[Dataset | None]]:
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    count = n_frames(ds)
    padded: list[Dataset | None] = [*per_frame[:count], *([None] * (count - len(per_frame)))]
    return shared, padded


def frame_rescales(ds: Dataset) -> np.ndarray:
    """(F, 2) array of (slope, intercept) per frame.

    From each frame's Pixel Value Transformation functional group, else the shared one,
    else the top-level RescaleSlope/RescaleIntercept, else 1 and 0.

    Raises
    ------
    InputError
        A slope of zero or a value that is not a finite number.
    """
    shared, per_frame = _frame_groups(ds)
    shared_item = _group_item(shared, "PixelValueTransformationSequence")
    result = np.empty((len(per_frame), 2), dtype=np.float64)
    for i, groups in enumerate(per_frame):
        item = _group_item(groups, "PixelValueTransformationSequence") or shared_item or ds
        result[i] = rescale_pair(
            item.get("RescaleSlope"), item.get("RescaleIntercept"), f"frame {i + 1}: "
        )
    return result


def decode_frames_hu(ds: Dataset) -> np.ndarray:
    """HU of every frame of a multi-frame CT instance: float32, shape (F, Rows, Columns).

    Raises
    ------
    InputError
        No pixel data or functional groups, colour data, pixel data that cannot be
        decoded or does not match Rows x Columns x NumberOfFrames, or an unusable rescale.
    """
    uid = ds.get("SOPInstanceUID", "?")
    rows, cols = slice_shape(ds, per_frame=True)
    frames = n_frames(ds)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        # Frames without functional groups have no per-frame geometry or rescale.
        raise InputError(
            f"instance {uid}: {frames} frames without functional groups; only Enhanced "
            "(functional group) multi-frame images are supported"
        )
    syntax = _ensure_transfer_syntax(ds)
    if not syntax.is_encapsulated:
        expected = frames * rows * cols * (int(ds.get("BitsAllocated") or 16) // 8)
        actual = len(ds.PixelData)
        if actual not in (expected, expected + 1):
            raise InputError(
                f"instance {uid}: pixel data has {actual} bytes, {frames} frames of "
                f"{rows}x{cols} need {expected}"
            )
    try:
        stored = np.asarray(ds.pixel_array)
    except Exception as exc:  # decoders raise many types
        raise InputError(
            f"instance {uid}: cannot decode pixel data ({syntax.name}): {exc}"
        ) from exc
    if stored.shape != (frames, rows, cols):
        raise InputError(
            f"instance {uid}: decoded pixel data has shape {stored.shape}, "
            f"expected ({frames}, {rows}, {cols})"
        )
    rescale = frame_rescales(ds)
    # Frame by frame: no float64 copy of the whole stack.
    hu = np.empty(stored.shape, np.float32)
    for i, (slope, intercept) in enumerate(rescale):
        hu[i] = stored[i].astype(np.float64) * slope + intercept
    return hu


def encode_frames_like(hu: np.ndarray, source: Dataset) -> np.ndarray:
    """Stored values for (F, Rows, Columns) HU with each source frame's own rescale.

    Raises
    ------
    ValueError
        ``hu`` has the wrong shape or is not finite.
    """
    values = np.asarray(hu, dtype=np.float64)
    expected = (n_frames(source), int(source.Rows), int(source.Columns))
    if values.shape != expected:
        raise ValueError(f"hu: shape {values.shape} does not match the source {expected}")
    if not np.all(np.isfinite(values)):
        raise ValueError("hu: contains NaN or infinite values")
    rescale = frame_rescales(source)
    low, high = stored_range(source)
    stored = np.clip(
        np.rint((values - rescale[:, 1, None, None]) / rescale[:, 0, None, None]), low, high
    )
    allocated = int(source.get("BitsAllocated") or 16)
    signed = int(source.get("PixelRepresentation", 0)) == 1
    kinds = {8: ("<i1", "<u1"), 16: ("<i2", "<u2"), 32: ("<i4", "<u4")}
    if allocated not in kinds:
        raise InputError(f"unsupported BitsAllocated {allocated}")
    return stored.astype(np.dtype(kinds[allocated][0 if signed else 1]))


def derived_type(values: list[str]) -> list[str]:
    """ImageType / FrameType of a derived Enhanced CT frame from the source's values."""
    flavor = values[2] if len(values) > 2 and values[2] else "VOLUME"
    return ["DERIVED", "PRIMARY", flavor, DERIVED_PIXEL_CONTRAST, *values[4:]]


def mark_frames_derived(
    out: Dataset,
    source: Dataset,
    *,
    description: str,
    derivation_code: Dataset,
    purpose_code: Dataset,
) -> None:
    """Make the functional groups of ``out`` (a copy of ``source``) those of derived frames.

    FrameType of every CT Image Frame Type group becomes DERIVED; each frame gets a
    Derivation Image group referencing its source frame (replacing any the source had);
    the Common Instance Reference module and the Source Image Evidence Sequence list the
    source instance.
    """
    shared, per_frame = _frame_groups(out)
    for groups in [shared, *per_frame]:
        item = _group_item(groups, "CTImageFrameTypeSequence")
        if item is not None and "FrameType" in item:
            item.FrameType = derived_type(strings(item.FrameType))
    if shared is not None and "DerivationImageSequence" in shared:
        del shared.DerivationImageSequence
    frames_seq = out.get("PerFrameFunctionalGroupsSequence")
    if frames_seq is None:
        frames_seq = Sequence([])
        out.PerFrameFunctionalGroupsSequence = frames_seq
    while len(frames_seq) < len(per_frame):
        frames_seq.append(Dataset())
    for number, groups in enumerate(frames_seq[: len(per_frame)], start=1):
        reference = _sop_reference(source)
        reference.ReferencedFrameNumber = number
        reference.PurposeOfReferenceCodeSequence = Sequence([_copy(purpose_code)])
        reference.SpatialLocationsPreserved = "YES"
        derivation = Dataset()
        derivation.DerivationDescription = description
        derivation.DerivationCodeSequence = Sequence([_copy(derivation_code)])
        derivation.SourceImageSequence = Sequence([reference])
        groups.DerivationImageSequence = Sequence([derivation])

    series = Dataset()
    series.SeriesInstanceUID = source.SeriesInstanceUID
    series.ReferencedInstanceSequence = Sequence([_sop_reference(source)])
    put_series_item(out, "ReferencedSeriesSequence", series)

    # Every instance the frames' Source Image Sequences refer to (hierarchical).
    evidence_series = Dataset()
    evidence_series.SeriesInstanceUID = source.SeriesInstanceUID
    evidence_series.ReferencedSOPSequence = Sequence([_sop_reference(source)])
    evidence = Dataset()
    evidence.StudyInstanceUID = source.get("StudyInstanceUID", "")
    evidence.ReferencedSeriesSequence = Sequence([evidence_series])
    out.SourceImageEvidenceSequence = Sequence([evidence])


def _sop_reference(source: Dataset) -> Dataset:
    """A new item referencing ``source`` by SOP Class and SOP Instance UID."""
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return reference


def _copy(item: Dataset) -> Dataset:
    return copy.deepcopy(item)
