"""The checks every pixel decode starts with: pixel data present, one sample per pixel,
and a slice size the networks take (bounded, so that a hostile header cannot make the
decoder allocate gigabytes before it fails)."""

from __future__ import annotations

from pydicom.dataset import Dataset

from ldct_node.dicom.values import InputError

#: Largest slice decoded (4096 x 4096): bounds the memory a hostile or broken header
#: (say Rows = Columns = 65535) can make the decoder allocate before it fails.
MAX_SLICE_PIXELS = 4096 * 4096


def has_pixel_data(ds: Dataset) -> bool:
    """Whether ``ds`` holds non-empty pixel data.

    Raises
    ------
    InputError
        The PixelData element cannot be read at all, e.g. its VR is corrupt (pydicom's
        NotImplementedError "Unknown Value Representation"). The receiver checks the
        header only, up to the pixel data, so a broken pixel element shows here first.
    """
    if "PixelData" not in ds:
        return False
    try:
        return bool(ds.PixelData)
    except (NotImplementedError, ValueError, TypeError, KeyError) as exc:
        what = (str(exc).splitlines() or [""])[0][:200]
        raise InputError(
            f"instance {ds.get('SOPInstanceUID', '?')}: its pixel data element cannot be "
            f"read ({type(exc).__name__}: {what})"
        ) from exc


def slice_shape(ds: Dataset, *, per_frame: bool = False) -> tuple[int, int]:
    """(Rows, Columns) of an instance whose pixels are about to be decoded.

    ``per_frame``: the instance is multi-frame, and the limit applies to each frame
    (one frame is one slice for the networks).

    Raises
    ------
    InputError
        No pixel data, colour data, missing or invalid Rows/Columns, or a slice size
        outside 1 to :data:`MAX_SLICE_PIXELS` pixels.
    """
    uid = ds.get("SOPInstanceUID", "?")
    if not has_pixel_data(ds):  # absent, or present and empty
        raise InputError(f"instance {uid} has no pixel data")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InputError(f"instance {uid}: {ds.SamplesPerPixel} samples per pixel, expected 1")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InputError(f"instance {uid}: missing or invalid Rows/Columns") from exc
    if rows < 1 or cols < 1 or rows * cols > MAX_SLICE_PIXELS:
        what = (
            f"frames of {rows}x{cols} pixels are not CT slices"
            if per_frame
            else f"{rows}x{cols} pixels is not a CT slice"
        )
        unit = "pixels per frame" if per_frame else "pixels"
        raise InputError(f"instance {uid}: {what} this node takes (1 to {MAX_SLICE_PIXELS} {unit})")
    return rows, cols
