"""DICOM input and output for CT series.

Writing
    :func:`write_ct_series` turns an (N, H, W) HU volume into a valid single-frame CT
    Image Storage series (tests, the simulator, the evaluation tools use it).
Pixels
    :func:`decode_hu` gives float32 HU for one CT instance in any transfer syntax pydicom
    can decode (with the pylibjpeg plugins: JPEG lossless, JPEG 2000, RLE);
    :func:`encode_like` is its inverse for a given source instance.
Reading
    :func:`scan_inputs` walks files and folders and groups the CT instances into series
    sorted along the slice normal; :func:`processing_skip_reason` decides whether an
    instance is denoised at all (including the loop guard against our own output).
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from ldct_node import __version__
from ldct_node.config import CT_IMAGE_STORAGE, SeriesSettings
from ldct_node.dicom.pixels import has_pixel_data, slice_shape
from ldct_node.dicom.values import InputError, n_frames, rescale_pair
from ldct_node.fsutil import write_atomic

logger = logging.getLogger(__name__)

#: Name that marks instances made by this node (loop guard, ContributingEquipment).
NODE_NAME = "ldct-node"

# Stored values of write_ct_series: signed 16-bit with the common CT rescale, so that
# air (-1000 HU) is stored near 0 and the whole int16 range maps to usable HU.
_WRITE_INTERCEPT = -1024.0
_WRITE_SLOPE = 1.0


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _da_tm(now: _dt.datetime) -> tuple[str, str]:
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")


def file_meta_for(ds: Dataset) -> FileMetaDataset:
    """File meta information for writing ``ds`` as explicit VR little endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"LDCT_NODE_{__version__}"[:16]
    return meta


def save_durably(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` (with its ``file_meta``) to ``path`` atomically.

    The bytes go to a temporary file in the same folder, are flushed and fsynced, then
    renamed over ``path``, so a crash never leaves a half-written instance under the final
    name. The folder is fsynced too so the rename itself survives a power loss.
    """
    return write_atomic(
        Path(path),
        lambda fh: ds.save_as(fh, enforce_file_format=True),
        suffix=".dcm",
        make_dir=lambda folder: folder.mkdir(parents=True, exist_ok=True),
    )


def _ds(value: float) -> str:
    """A Decimal String of at most 16 characters (DICOM's DS limit), as exact as fits."""
    return format_number_as_ds(float(value))


def _set_by_keyword(ds: Dataset, keyword: str, value: object) -> None:
    if tag_for_keyword(keyword) is None:
        raise ValueError(f"extra: {keyword!r} is not a DICOM keyword")
    setattr(ds, keyword, value)


def write_ct_series(
    volume_hu: np.ndarray,
    output_dir: Path,
    *,
    pixel_spacing_mm: float,
    slice_thickness_mm: float,
    series_description: str,
    series_number: int,
    study_uid: str,
    frame_of_reference_uid: str,
    patient_name: str,
    patient_id: str,
    series_uid: str | None = None,
    start_z_mm: float = 0.0,
    extra: dict[str, object] | None = None,
) -> list[Path]:
    """Write an (N, H, W) HU volume as N single-frame CT Image Storage instances.

    The instances are axial (orientation 1\\0\\0\\0\\1\\0), stored as signed 16-bit with
    RescaleIntercept -1024 and RescaleSlope 1, explicit VR little endian, and carry every
    type 1 and 2 attribute of the CT Image IOD so that ``dciodvfy`` reports no errors.
    Slice ``i`` lies at z = ``start_z_mm + i * slice_thickness_mm`` and has InstanceNumber
    ``i + 1``; files are named ``CT0001.dcm``, ``CT0002.dcm``, ...

    Parameters
    ----------
    volume_hu
        HU values, shape (N, H, W); rounded to the nearest stored value and clipped to
        the representable range [-32768 - 1024, 32767 - 1024].
    output_dir
        Created if missing.
    series_uid
        ``None``: a new random UID. SOPInstanceUIDs are derived from it deterministically.
    extra
        Further attributes by DICOM keyword (e.g. ``{"KVP": "100"}``); they are set last
        and so override the defaults.

    Returns
    -------
    list[Path]
        The written files in slice order.
    """
    volume = np.asarray(volume_hu)
    if volume.ndim != 3 or min(volume.shape) < 1:
        raise ValueError(f"volume_hu: expected a non-empty (N, H, W) array, got {volume.shape}")
    if not np.issubdtype(volume.dtype, np.number) or not np.all(np.isfinite(volume)):
        raise ValueError("volume_hu: must be numeric and finite")
    if not pixel_spacing_mm > 0:
        raise ValueError(f"pixel_spacing_mm: must be > 0, got {pixel_spacing_mm}")
    if not slice_thickness_mm > 0:
        raise ValueError(f"slice_thickness_mm: must be > 0, got {slice_thickness_mm}")
    for name, uid in (("study_uid", study_uid), ("frame_of_reference_uid", frame_of_reference_uid)):
        if not uid:
            raise ValueError(f"{name}: must be a UID, got {uid!r}")

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    n, rows, cols = volume.shape
    date, time = _da_tm(_dt.datetime.now())

    stored_all = np.clip(
        np.rint((volume.astype(np.float64) - _WRITE_INTERCEPT) / _WRITE_SLOPE), -32768, 32767
    ).astype(np.int16)

    paths: list[Path] = []
    for i in range(n):
        ds = Dataset()
        # SOP Common
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, "instance", str(i)])
        ds.InstanceCreationDate = date
        ds.InstanceCreationTime = time
        # Patient
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        # General Study
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = date
        ds.StudyTime = time
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        # General Series
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = int(series_number)
        ds.SeriesDescription = series_description
        ds.SeriesDate = date
        ds.SeriesTime = time
        ds.PatientPosition = "HFS"
        # An unpaired body part, so Laterality (type 2C) is rightly absent.
        ds.BodyPartExamined = "CHEST"
        # Frame of Reference
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        # General Equipment
        ds.Manufacturer = NODE_NAME
        ds.ManufacturerModelName = "write_ct_series"
        ds.SoftwareVersions = __version__
        # General Acquisition / General Image
        ds.AcquisitionNumber = 1
        ds.AcquisitionDate = date
        ds.AcquisitionTime = time
        ds.ContentDate = date
        ds.ContentTime = time
        ds.InstanceNumber = i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BurnedInAnnotation = "NO"
        # Image Plane
        z = float(start_z_mm) + i * float(slice_thickness_mm)
        ds.PixelSpacing = [_ds(pixel_spacing_mm), _ds(pixel_spacing_mm)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        # Centre the field of view on the patient axis, as scanners do.
        ds.ImagePositionPatient = [
            _ds(-(cols - 1) * float(pixel_spacing_mm) / 2.0),
            _ds(-(rows - 1) * float(pixel_spacing_mm) / 2.0),
            _ds(z),
        ]
        ds.SliceThickness = _ds(slice_thickness_mm)
        ds.SliceLocation = _ds(z)
        # CT Image
        ds.KVP = 120
        ds.RescaleIntercept = _WRITE_INTERCEPT
        ds.RescaleSlope = _WRITE_SLOPE
        ds.RescaleType = "HU"
        # VOI LUT: a soft-tissue window
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        # Image Pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.PixelData = np.ascontiguousarray(stored_all[i]).astype("<i2").tobytes()
        ds["PixelData"].VR = "OW"

        for keyword, value in (extra or {}).items():
            _set_by_keyword(ds, keyword, value)

        ds.file_meta = file_meta_for(ds)
        paths.append(save_durably(ds, output_dir / f"CT{i + 1:04d}.dcm"))
    logger.debug("wrote %d CT instances of series %s to %s", n, series_uid, output_dir)
    return paths


# --------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------


def rescale_of(ds: Dataset) -> tuple[float, float]:
    """(slope, intercept) of ``ds``; missing values mean 1 and 0 (logged at debug level)."""
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    if slope is None or intercept is None:
        logger.debug(
            "instance %s has no RescaleSlope/RescaleIntercept; assuming slope 1, intercept 0",
            ds.get("SOPInstanceUID", "?"),
        )
    return rescale_pair(slope, intercept)


def stored_range(ds: Dataset) -> tuple[int, int]:
    """Smallest and largest stored pixel value allowed by BitsStored/PixelRepresentation."""
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if not 1 <= bits <= 32:
        raise InputError(f"unusable BitsStored {bits}")
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _stored_dtype(ds: Dataset) -> np.dtype:
    allocated = int(ds.get("BitsAllocated") or 16)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    kinds = {8: ("<i1", "<u1"), 16: ("<i2", "<u2"), 32: ("<i4", "<u4")}
    if allocated not in kinds:
        raise InputError(f"unsupported BitsAllocated {allocated}")
    return np.dtype(kinds[allocated][0 if signed else 1])


def _ensure_transfer_syntax(ds: Dataset) -> UID:
    """The transfer syntax of ``ds``; for a data set read without file meta (no preamble),
    the encoding dcmread detected is recorded in ``ds.file_meta`` so pixels can be decoded."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax:
        return UID(syntax)
    implicit, little = ds.original_encoding
    if little is False:
        inferred = ExplicitVRBigEndian
    else:
        inferred = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    logger.debug(
        "instance %s has no transfer syntax; using %s as read",
        ds.get("SOPInstanceUID", "?"),
        inferred.name,
    )
    if meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = inferred
    return inferred


def decode_hu(ds: Dataset) -> np.ndarray:
    """The HU image (float32, shape (Rows, Columns)) of one single-frame CT instance.

    Any transfer syntax pydicom can decode works (with the pylibjpeg plugins: JPEG
    lossless, JPEG 2000, RLE). RescaleSlope/RescaleIntercept are applied; without them
    the stored values are taken as HU. A data set read from a file without file meta gets
    ``file_meta.TransferSyntaxUID`` filled in from the encoding it was read with.

    Raises
    ------
    InputError
        No pixel data, multi-frame or colour data, pixel data that cannot be decoded
        (corrupt, truncated, unsupported compression) or that does not match Rows/Columns,
        or image attributes with unusable values (e.g. sent with a wrong VR).
    """
    try:
        return _decode_hu(ds)
    except InputError:
        raise
    except (TypeError, ValueError, AttributeError, OverflowError, KeyError) as exc:
        raise InputError(
            f"instance {ds.get('SOPInstanceUID', '?')}: unusable image attributes "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def _decode_hu(ds: Dataset) -> np.ndarray:
    uid = ds.get("SOPInstanceUID", "?")
    if not has_pixel_data(ds):  # absent, or present and empty
        raise InputError(f"instance {uid} has no pixel data")
    if n_frames(ds) > 1:
        raise InputError(
            f"instance {uid}: multi-frame images ({n_frames(ds)} frames, e.g. Enhanced CT) "
            "are not supported yet"
        )
    rows, cols = slice_shape(ds)
    syntax = _ensure_transfer_syntax(ds)
    if not syntax.is_encapsulated:
        # pydicom tolerates excess native pixel data (it warns and trims); a header that
        # disagrees with the data is a broken instance, not something to guess around.
        expected = rows * cols * (int(ds.get("BitsAllocated") or 16) // 8)
        actual = len(ds.PixelData)
        if actual not in (expected, expected + 1):
            raise InputError(
                f"instance {uid}: pixel data has {actual} bytes, {rows}x{cols} needs {expected}"
            )
    try:
        stored = ds.pixel_array
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        # Decoders raise many types (ValueError, RuntimeError, ...); the Rust-based
        # pylibjpeg-rle even a BaseException (pyo3's PanicException) on some corrupt
        # frames, which would otherwise kill the worker thread.
        raise InputError(
            f"instance {uid}: cannot decode pixel data ({syntax.name}): {exc}"
        ) from exc
    if stored.shape != (rows, cols):
        raise InputError(
            f"instance {uid}: decoded pixel data has shape {stored.shape}, "
            f"expected ({rows}, {cols})"
        )
    slope, intercept = rescale_of(ds)
    hu = (stored.astype(np.float64) * slope + intercept).astype(np.float32)
    if not np.all(np.isfinite(hu)):  # e.g. RescaleSlope 1e308
        raise InputError(
            f"instance {uid}: RescaleSlope {slope:g} / RescaleIntercept {intercept:g} give "
            "HU values out of range"
        )
    return hu


def encode_like(hu: np.ndarray, source: Dataset) -> np.ndarray:
    """Stored pixel values for ``hu`` with the rescale and pixel format of ``source``.

    The inverse of :func:`decode_hu`: ``(hu - intercept) / slope``, rounded to the nearest
    integer and clipped to the range BitsStored and PixelRepresentation allow, as the
    little-endian integer dtype BitsAllocated gives (e.g. ``<i2``).

    Raises
    ------
    ValueError
        ``hu`` is not finite or its shape does not match the source's Rows/Columns.
    """
    values = np.asarray(hu, dtype=np.float64)
    if "Rows" in source and "Columns" in source:
        expected = (int(source.Rows), int(source.Columns))
        if values.shape != expected:
            raise ValueError(f"hu: shape {values.shape} does not match the source {expected}")
    if not np.all(np.isfinite(values)):
        raise ValueError("hu: contains NaN or infinite values")
    slope, intercept = rescale_of(source)
    low, high = stored_range(source)
    stored = np.clip(np.rint((values - intercept) / slope), low, high)
    return stored.astype(_stored_dtype(source))


# --------------------------------------------------------------------------------------
# Reading and grouping
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputProblem:
    """A file that could not be used as input, and why (one line for a person)."""

    path: Path
    reason: str


@dataclass
class SeriesGroup:
    """The instances of one series, sorted along the slice normal.

    ``instances`` pairs each file with its header (read without pixel data).
    """

    series_uid: str
    instances: list[tuple[Path, Dataset]] = field(default_factory=list)

    @property
    def study_uid(self) -> str:
        return str(self.instances[0][1].get("StudyInstanceUID", "")) if self.instances else ""

    @property
    def modality(self) -> str:
        return str(self.instances[0][1].get("Modality", "")) if self.instances else ""

    @property
    def n_instances(self) -> int:
        return len(self.instances)

    @property
    def paths(self) -> list[Path]:
        return [path for path, _ in self.instances]


@dataclass
class ScanResult:
    """What :func:`scan_inputs` found: series in input order and unusable files."""

    series: list[SeriesGroup] = field(default_factory=list)
    problems: list[InputProblem] = field(default_factory=list)


def _is_hidden(path: Path, root: Path) -> bool:
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        parts = path.parts
    return any(part.startswith(".") for part in parts)


def _iter_files(paths: Sequence[Path], problems: list[InputProblem]) -> Iterator[Path]:
    seen: set[Path] = set()
    for raw in paths:
        root = Path(raw)
        if root.is_dir():
            candidates = sorted(p for p in root.rglob("*") if p.is_file())
            # Hidden files (editor backups, .DS_Store) and DICOMDIR indexes are no instances.
            candidates = [
                p for p in candidates if not _is_hidden(p, root) and p.name.upper() != "DICOMDIR"
            ]
        elif root.is_file():
            candidates = [root]
        else:
            problems.append(InputProblem(root, "no such file or folder"))
            continue
        for path in candidates:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                yield path


def _pixel_data_problem(fh: BinaryIO, ds: Dataset, file_size: int) -> str | None:
    """Check the PixelData element at the current position of ``fh`` is complete.

    ``dcmread`` is lenient with truncated files (it returns what it could read), so a file
    cut inside its pixel data would pass a header-only read. This reads the element header
    where ``stop_before_pixels`` stopped and compares the declared length with the file.
    """
    start = fh.tell()
    header = fh.read(12)
    if len(header) < 8:
        # Nothing after the header: fine for non-image objects, truncation for images.
        return "pixel data missing (file truncated?)" if "Rows" in ds else None
    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None)
    if syntax is None:
        # No file meta: use the encoding dcmread detected for the data set.
        implicit_or_none, little_or_none = ds.original_encoding
        implicit, little = bool(implicit_or_none), little_or_none is not False
    else:
        implicit, little = bool(syntax.is_implicit_VR), bool(syntax.is_little_endian)
    if syntax is not None and syntax.is_deflated:
        return None  # the stream is compressed; the decoder will find any damage
    end = "<" if little else ">"
    group, elem = struct.unpack(end + "HH", header[:4])
    if (group, elem) not in ((0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)):
        return None
    if implicit:
        (length,) = struct.unpack(end + "L", header[4:8])
        value_start = start + 8
    else:
        vr = header[4:6]
        if vr in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"):
            if len(header) < 12:
                return "pixel data truncated"
            (length,) = struct.unpack(end + "L", header[8:12])
            value_start = start + 12
        else:
            (length,) = struct.unpack(end + "H", header[6:8])
            value_start = start + 8
    if length == 0xFFFFFFFF:
        # Encapsulated: the fragments end with a Sequence Delimitation Item.
        fh.seek(max(file_size - 8, value_start))
        tail = fh.read(8)
        delimiter = struct.pack(end + "HHL", 0xFFFE, 0xE0DD, 0)
        return None if tail == delimiter else "encapsulated pixel data truncated"
    if value_start + length > file_size:
        return f"pixel data truncated ({file_size - value_start} of {length} bytes present)"
    return None


def _read(path: Path, *, header_only: bool) -> Dataset:
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            try:
                ds = dcmread(fh, stop_before_pixels=True)
            except InvalidDicomError:
                fh.seek(0)
                ds = dcmread(fh, stop_before_pixels=True, force=True)
                if "SOPClassUID" not in ds:
                    raise InputError("not a DICOM file") from None
            if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
                raise InputError("not a DICOM instance (no SOPClassUID/SOPInstanceUID)")
            problem = _pixel_data_problem(fh, ds, size)
            if not problem and not header_only:
                fh.seek(0)
                ds = dcmread(fh, force=True)
    except InputError:
        raise
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}") from exc
    except Exception as exc:  # pydicom raises assorted errors on garbage input
        raise InputError(f"not readable as DICOM: {type(exc).__name__}: {exc}") from exc
    if problem:
        raise InputError(problem)
    return ds


def read_header(path: Path) -> Dataset:
    """Read the header of one DICOM file without its pixel data.

    Files without the 128-byte preamble are accepted when they parse as DICOM and carry a
    SOPClassUID.

    Raises
    ------
    InputError
        Not DICOM, unreadable, or an image whose pixel data is cut short.
    """
    return _read(path, header_only=True)


def read_instance(path: Path) -> Dataset:
    """Read one DICOM file with its pixel data, by the same rules as :func:`read_header`.

    Use it for files :func:`scan_inputs` accepted: plain ``dcmread`` refuses files without
    the preamble that the scan takes.

    Raises
    ------
    InputError
        As :func:`read_header`.
    """
    return _read(path, header_only=False)


def _floats(ds: Dataset, keyword: str, n: int) -> list[float] | None:
    """The ``n`` finite numbers of a DS element; None when absent or not exactly that.

    A value pydicom has not converted yet is read from its bytes (DS is text): the
    receiver orders every instance it takes by these, and pydicom's conversion cost
    ten times more. Anything unusual goes through pydicom.
    """
    try:
        elem = ds.get_item(keyword)
    except (KeyError, ValueError, TypeError):
        return None
    if elem is None:
        return None
    raw = elem.value if isinstance(elem, RawDataElement) and elem.VR in ("DS", None) else None
    values: list[float] | None = None
    if isinstance(raw, bytes):
        try:
            values = [float(v) for v in raw.split(b"\\")]
        except ValueError:
            values = None
    if values is None:
        try:
            values = [float(v) for v in ds.get(keyword) or []]
        except (TypeError, ValueError):
            return None
    return values if len(values) == n and all(map(math.isfinite, values)) else None


def pixel_spacing_mm(ds: Dataset) -> float | None:
    """In-plane pixel size (mean of row and column spacing) in mm, from PixelSpacing or,
    for multi-frame instances, the shared or first per-frame Pixel Measures; None when
    absent or unusable."""
    candidates: list[Any] = [ds.get("PixelSpacing")]
    for groups_keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(groups_keyword)
        if groups:
            measures = groups[0].get("PixelMeasuresSequence")
            if measures:
                candidates.append(measures[0].get("PixelSpacing"))
    for value in candidates:
        try:
            pair = [float(v) for v in value]
        except (TypeError, ValueError):
            continue
        if len(pair) == 2 and all(np.isfinite(v) and v > 0 for v in pair):
            return (pair[0] + pair[1]) / 2.0
    return None


def _unit_normal(ds: Dataset) -> tuple[float, float, float] | None:
    """Row x column direction, normalised (plain floats: numpy's call overhead on
    3-vectors was most of the receiver's 0.5 ms per instance here)."""
    iop = _floats(ds, "ImageOrientationPatient", 6)
    if iop is None:
        return None
    rx, ry, rz, cx, cy, cz = iop
    nx, ny, nz = ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx
    norm = math.sqrt(nx * nx + ny * ny + nz * nz)
    return (nx / norm, ny / norm, nz / norm) if norm > 1e-6 else None


def slice_normal(ds: Dataset) -> np.ndarray | None:
    """Unit normal of the image plane (row x column direction), or ``None``."""
    normal = _unit_normal(ds)
    return None if normal is None else np.array(normal)


#: The slice normal assumed where an instance has no usable orientation: axial.
AXIAL_NORMAL: tuple[float, float, float] = (0.0, 0.0, 1.0)


def slice_position(ds: Dataset, normal: np.ndarray | None = None) -> float | None:
    """Position (mm) of an instance along ``normal`` (default: its own slice normal, or
    the patient z axis without ImageOrientationPatient), for ordering a series.

    Projecting on the normal orders oblique and gantry-tilted stacks correctly. The
    receiver (for the job table) and ``denoise`` (for files) both order by this.
    ``None`` when the instance has no usable ImagePositionPatient.
    """
    try:
        axis = _unit_normal(ds) if normal is None else tuple(float(v) for v in normal)
        ipp = _floats(ds, "ImagePositionPatient", 3)
    except (TypeError, ValueError, IndexError, AttributeError):  # unparseable values
        return None
    if ipp is None:
        return None
    nx, ny, nz = axis or AXIAL_NORMAL
    value = nx * ipp[0] + ny * ipp[1] + nz * ipp[2]
    return value if math.isfinite(value) else None


def _instance_number(ds: Dataset) -> int | None:
    try:
        value = ds.get("InstanceNumber")
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _sort_instances(items: list[tuple[Path, Dataset]]) -> list[tuple[Path, Dataset]]:
    """Sort by position along the first instance's slice normal, else InstanceNumber,
    else file name. One rule for the whole series, so a few instances without geometry
    cannot interleave two orderings."""
    if not items:
        return items
    series_uid = items[0][1].get("SeriesInstanceUID", "?")
    normal = slice_normal(items[0][1])
    positions = [slice_position(ds, normal) for _, ds in items]
    numbers = [_instance_number(ds) for _, ds in items]
    names = [str(path) for path, _ in items]
    keys: list[tuple[float, int, str]]
    if all(p is not None for p in positions):
        keys = [(p or 0.0, n or 0, f) for p, n, f in zip(positions, numbers, names, strict=True)]
    elif all(n is not None for n in numbers):
        logger.debug("series %s: incomplete geometry, sorting by InstanceNumber", series_uid)
        keys = [(0.0, n or 0, f) for n, f in zip(numbers, names, strict=True)]
    else:
        logger.debug("series %s: no geometry or InstanceNumber, sorting by file name", series_uid)
        keys = [(0.0, 0, f) for f in names]
    order = sorted(range(len(items)), key=keys.__getitem__)
    return [items[i] for i in order]


def scan_inputs(paths: Sequence[Path]) -> ScanResult:
    """Read DICOM files and folders (recursively) and group the instances by series.

    Hidden files and folders (names starting with ``.``) are skipped. Headers are read
    without pixel data. Within a series, instances are sorted along the slice normal
    (ImageOrientationPatient x ImagePositionPatient), falling back to InstanceNumber, then
    to the file name; an instance whose SOPInstanceUID was already seen in the series is
    kept once. Files that are not DICOM or cannot be read are listed in ``problems``.
    Series appear in the order their first file was found.
    """
    if isinstance(paths, str | os.PathLike):
        raise TypeError("paths: expected a sequence of paths, not a single path")
    problems: list[InputProblem] = []
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    seen_sops: dict[str, set[str]] = {}
    for path in _iter_files(paths, problems):
        try:
            ds = read_header(path)
        except InputError as exc:
            problems.append(InputProblem(path, str(exc)))
            continue
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not series_uid:
            problems.append(InputProblem(path, "no SeriesInstanceUID"))
            continue
        sop_uid = str(ds.SOPInstanceUID)
        sops = seen_sops.setdefault(series_uid, set())
        if sop_uid in sops:
            # UIDs only: file names may carry patient names.
            logger.warning(
                "duplicate instance %s in series %s: keeping the first copy", sop_uid, series_uid
            )
            continue
        sops.add(sop_uid)
        groups.setdefault(series_uid, []).append((path, ds))
    series = [SeriesGroup(uid, _sort_instances(items)) for uid, items in groups.items()]
    if problems:
        logger.info("%d input file(s) could not be used", len(problems))
    return ScanResult(series=series, problems=problems)


# --------------------------------------------------------------------------------------
# Eligibility
# --------------------------------------------------------------------------------------


def _names_node(value: object) -> bool:
    """True when a string or multi-value names this node (case-insensitive)."""
    if value is None:
        return False
    values = [value] if isinstance(value, str | bytes) else value
    try:
        return any(NODE_NAME in str(v).lower() for v in values)  # type: ignore[attr-defined]
    except TypeError:  # not iterable: a single non-string value
        return NODE_NAME in str(value).lower()


#: The header elements :func:`processing_skip_reason` (and :func:`is_own_output`) read.
SKIP_CHECK_KEYWORDS = (
    "ContributingEquipmentSequence",
    "SoftwareVersions",
    "DerivationDescription",
    "SOPClassUID",
    "Modality",
    "ImageType",
)
#: The header elements :func:`slice_position` reads.
POSITION_KEYWORDS = ("ImagePositionPatient", "ImageOrientationPatient")


def is_own_output(ds: Dataset) -> bool:
    """True for instances this node derived (the loop guard).

    Looks at ContributingEquipmentSequence (Manufacturer), SoftwareVersions and
    DerivationDescription, which :func:`ldct_node.dicom.derive.derive_instance` all fill in.
    Series written by :func:`write_ct_series` (e.g. simulated low-dose data) are not own
    output: they are originals and may be denoised.
    """
    items = ds.get("ContributingEquipmentSequence", None)
    for item in items if isinstance(items, DicomSequence) else []:  # wrong VR: no items
        if not isinstance(item, Dataset):
            continue
        if _names_node(item.get("Manufacturer")) or _names_node(item.get("SoftwareVersions")):
            return True
    return _names_node(ds.get("SoftwareVersions")) or _names_node(ds.get("DerivationDescription"))


def processing_skip_reason(ds: Dataset, series_settings: SeriesSettings) -> str | None:
    """Why an instance is not denoised, or ``None`` when it should be.

    The checks, in order: our own output (always, whatever the config: the loop guard),
    SOP class not in ``accept_sop_classes``, Modality not CT, an ImageType value in
    ``skip_image_types`` (e.g. LOCALIZER), ImageType value 1 DERIVED when
    ``ignore_derived``.
    """
    if is_own_output(ds):
        return "output of ldct-node (loop guard)"
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class not in series_settings.accept_sop_classes:
        name = getattr(ds.get("SOPClassUID"), "name", "") or "unknown"
        return f"SOP class {sop_class or '(none)'} ({name}) not accepted"
    modality = str(ds.get("Modality", "") or "")
    if modality.upper() != "CT":
        return f"modality {modality or '(none)'} is not CT"
    raw_type = ds.get("ImageType")
    if raw_type is None or raw_type == "":
        image_type: list[str] = []
    elif isinstance(raw_type, str):
        image_type = [raw_type]
    else:
        try:
            image_type = [str(v) for v in raw_type]
        except TypeError:  # a single number: ImageType sent with a wrong VR
            image_type = [str(raw_type)]
    image_type = [v.strip().upper() for v in image_type]
    skip = {s.strip().upper() for s in series_settings.skip_image_types}
    hits = [v for v in image_type if v in skip]
    if hits:
        return f"image type {hits[0]}"
    if series_settings.ignore_derived and image_type and image_type[0] == "DERIVED":
        return "derived image (ImageType DERIVED)"
    return None
