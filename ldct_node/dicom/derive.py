"""Derived DICOM instances: one factory that turns a source CT instance plus denoised HU
into the instance the node sends back (README, "Connect to your PACS").

Decisions worth knowing:

* UIDs are deterministic (:func:`derived_series_uid`, :func:`derived_sop_uid`), so
  reprocessing a series yields the same UIDs and PACS deduplicates. With an empty
  ``uid_root`` pydicom's root is used: ``generate_uid(prefix=None)`` would ignore the
  entropy and give a random ``2.25`` UID.
* DerivationCodeSequence uses (113087, DCM, "Smoothing") from CID 7203 "Image Derivation".
  CID 7203 has no noise-reduction concept; 113086 is "Edge enhancement", which would be
  wrong. Smoothing is the closest standard concept for denoising.
* Private tags are dropped: their meaning is unknown to us, some vendors keep pixel
  related data or PHI there, and a private block without its creator breaks readers.
* Lossy history is kept: LossyImageCompression "01" with its ratio and method stays (and is
  added when the source transfer syntax was lossy JPEG), because derived pixels inherit
  the loss.
* SeriesDate/SeriesTime stay those of the source: they must be equal across the series
  and a per-instance "now" would not be. InstanceCreation and Content date/time are fresh.
* Dropped because they no longer apply: Icon Image Sequence, overlays (60xx) and curves
  (50xx), smallest/largest pixel value attributes, digital signatures, encapsulation
  tables, group lengths, the source's SourceImage/DerivationCode sequences.
"""

from __future__ import annotations

import copy
import logging
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import PYDICOM_ROOT_UID, UID, generate_uid

from ldct_node import __version__
from ldct_node.config import DicomSettings, OutputProfile
from ldct_node.dicom.enhanced import (
    derived_type,
    encode_frames_like,
    is_multiframe,
    mark_frames_derived,
)
from ldct_node.dicom.io import NODE_NAME, encode_like, file_meta_for, save_durably, stored_range
from ldct_node.dicom.values import put_series_item, strings

logger = logging.getLogger(__name__)

DEFAULT_ALGORITHM = "ldct-node two-network DRL cascade"

# (value, scheme, meaning) of the coded concepts we write.
CODE_SMOOTHING = ("113087", "DCM", "Smoothing")  # CID 7203 Image Derivation
CODE_SOURCE_IMAGE = ("121322", "DCM", "Source image for image processing operation")  # CID 7202
CODE_SOURCE_SERIES = ("121323", "DCM", "Source series for image processing operation")  # 7210
CODE_MODIFYING_EQUIPMENT = ("109103", "DCM", "Modifying Equipment")  # CID 7005

# Transfer syntaxes that are lossy by definition; for the others (e.g. JPEG 2000, which
# may be either) the source's own LossyImageCompression attribute is trusted.
_LOSSY_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG extended
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",  # JPEG-LS near-lossless
}

_DROP_KEYWORDS = (
    "PixelData",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "PixelDataProviderURL",
    "IconImageSequence",
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries",
    "DigitalSignaturesSequence",
    "MACParametersSequence",
    "DataSetTrailingPadding",
    "InstanceCreatorUID",
    "SourceImageSequence",
    "DerivationCodeSequence",
)
_DROP_TAGS = frozenset(int(Tag(k)) for k in _DROP_KEYWORDS)

_LO_MAX = 64
_ST_MAX = 1024


# --------------------------------------------------------------------------------------
# UIDs
# --------------------------------------------------------------------------------------


def derived_uid(uid_root: str, *parts: str) -> str:
    """A UID that depends only on ``uid_root`` and ``parts`` (the one UID helper).

    The parts are length-prefixed before hashing so that e.g. ("ab", "c") and ("a", "bc")
    give different UIDs. An empty root means pydicom's root.
    """
    if not parts:
        raise ValueError("parts: at least one entropy source is needed")
    prefix = uid_root or PYDICOM_ROOT_UID
    if not prefix.endswith("."):
        prefix += "."
    return str(generate_uid(prefix=prefix, entropy_srcs=[f"{len(p)}:{p}" for p in parts]))


def derived_series_uid(
    source_series_uid: str, model_version: str, profile_name: str, uid_root: str
) -> str:
    """SeriesInstanceUID of the derived series for one (source series, profile, model)."""
    return derived_uid(uid_root, "series", source_series_uid, model_version, profile_name)


def derived_sop_uid(
    source_sop_uid: str, model_version: str, profile_name: str, uid_root: str
) -> str:
    """SOPInstanceUID of the derived instance for one (source instance, profile, model)."""
    return derived_uid(uid_root, "instance", source_sop_uid, model_version, profile_name)


# --------------------------------------------------------------------------------------
# The factory
# --------------------------------------------------------------------------------------


def _code_item(code: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def _dropped(tag: BaseTag) -> bool:
    group = tag.group
    return (
        tag.is_private
        or group in (0x0000, 0x0002)  # command / file meta elements never belong in a body
        or tag.element == 0  # group lengths: retired, recomputed by nobody
        or int(tag) in _DROP_TAGS
        or 0x6000 <= group <= 0x60FF  # overlays
        or 0x5000 <= group <= 0x50FF  # curves (retired)
    )


def _wrong_vr(elem: DataElement) -> bool:
    """True for a public element whose VR contradicts the data dictionary (a corrupt or
    mis-encoded header): copied over it would make the derived file unwritable."""
    try:
        expected = dictionary_VR(elem.tag)
    except KeyError:
        return False  # not in the dictionary (or private): nothing to check against
    return elem.VR not in (expected, *expected.split(" or "))


def _copy_public(source: Dataset, *, top_level: bool = True) -> Dataset:
    """A deep copy of the public attributes of ``source`` (recursing into sequences),
    without those that no longer apply to the derived image."""
    out = Dataset()
    for elem in source:  # iterating converts raw (deferred) elements as it goes
        # Inside sequence items only private tags and group lengths go; the rest of the
        # drop list is about this image's own pixels and identity.
        drop = _dropped(elem.tag) if top_level else elem.tag.is_private or elem.tag.element == 0
        if drop or _wrong_vr(elem):
            continue
        if elem.VR == "SQ":
            items = [_copy_public(item, top_level=False) for item in elem.value]
            out.add(DataElement(elem.tag, "SQ", Sequence(items)))
        else:
            out.add(copy.deepcopy(elem))
    return out


def _fit(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "~"


def _dt_strings(now: datetime) -> tuple[str, str, str]:
    date = now.strftime("%Y%m%d")
    time = now.strftime("%H%M%S.%f")
    stamp = date + time + (now.strftime("%z") if now.tzinfo is not None else "")
    return date, time, stamp


def _padding_range(source: Dataset) -> tuple[int, int] | None:
    if "PixelPaddingValue" not in source:
        return None
    pad = int(source.PixelPaddingValue)
    limit = int(source.get("PixelPaddingRangeLimit", pad))
    return min(pad, limit), max(pad, limit)


def _keep_padding(stored: np.ndarray, source: Dataset, out: Dataset) -> np.ndarray:
    """Keep pixel padding (e.g. outside the reconstruction circle) exactly as in the source.

    Padding pixels are restored to their source values, and real pixels that landed in the
    padding range after denoising are moved just outside it so they stay real pixels.
    Without source pixels (header-only dataset) the padding attributes are dropped.
    """
    bounds = _padding_range(source)
    if bounds is None:
        return stored
    try:
        source_stored = np.asarray(source.pixel_array)
    except Exception:  # no or undecodable pixels: padding cannot be located
        source_stored = None
    if source_stored is None or source_stored.shape != stored.shape:
        logger.debug("no source pixels to locate padding; dropping the padding attributes")
        for keyword in ("PixelPaddingValue", "PixelPaddingRangeLimit"):
            if keyword in out:
                delattr(out, keyword)
        return stored
    low, high = bounds
    is_pad = (source_stored >= low) & (source_stored <= high)
    result = np.where(is_pad, source_stored.astype(stored.dtype), stored)
    clash = ~is_pad & (result >= low) & (result <= high)
    if clash.any():
        _, stored_max = stored_range(source)
        result[clash] = high + 1 if high < stored_max else low - 1
    return result


def _lossy_history(source: Dataset, out: Dataset) -> None:
    syntax = str(getattr(getattr(source, "file_meta", None), "TransferSyntaxUID", "") or "")
    method = _LOSSY_SYNTAXES.get(syntax)
    if method is not None and out.get("LossyImageCompression") != "01":
        out.LossyImageCompression = "01"
        methods = strings(out.get("LossyImageCompressionMethod"))
        if method not in methods:
            out.LossyImageCompressionMethod = [*methods, method]


def _charset_for_new_text(out: Dataset) -> None:
    """Switch to UTF-8 when text we added (comments from the config, a suffix, the model
    version) is not ASCII and the source character set is the default one.

    The copied values are held decoded, so pydicom re-encodes them in UTF-8 on writing.
    Sources that already declare a character set keep it: their values and ours are then
    written in it, and a character it cannot hold fails loudly at write time.
    """
    texts = [
        str(out.get(k, "") or "")
        for k in ("ImageComments", "SeriesDescription", "DerivationDescription")
    ]
    if all(t.isascii() for t in texts):
        return
    charset = strings(out.get("SpecificCharacterSet"))
    if not charset or charset == ["ISO_IR 6"]:
        out.SpecificCharacterSet = "ISO_IR 192"


def _series_description(source: Dataset, suffix: str) -> str:
    base = str(source.get("SeriesDescription", "") or "")
    if not base:
        return _fit(suffix.strip(), _LO_MAX)
    # LO holds 64 characters; keep the suffix whole so the derived series stays recognisable.
    room = _LO_MAX - len(suffix)
    if room <= 0:
        return _fit(suffix.strip(), _LO_MAX)
    return (base if len(base) <= room else base[:room].rstrip()) + suffix


def derive_instance(
    source: Dataset,
    denoised_hu: np.ndarray,
    *,
    profile: OutputProfile,
    model_version: str,
    dicom: DicomSettings,
    algorithm: str = DEFAULT_ALGORITHM,
    now: datetime | None = None,
) -> Dataset:
    """The derived instance for ``source`` carrying ``denoised_hu`` (the rules above).

    Parameters
    ----------
    source
        The source instance; pixel data is needed only to preserve pixel padding. It is
        not modified.
    denoised_hu
        Final HU image (after blending), shape (Rows, Columns) of the source; for a
        multi-frame (Enhanced CT) source (NumberOfFrames, Rows, Columns).
    profile
        The output profile: series number offset, description suffix, blend, name.
    model_version
        Identifies the weights; part of the UIDs and of the derivation description.
    dicom
        ``uid_root`` and ``image_comments``.
    algorithm
        Named in DerivationDescription.
    now
        Creation time (default: the local time now).

    Returns
    -------
    Dataset
        With ``file_meta`` for explicit VR little endian, ready for :func:`write_derived`.

    Raises
    ------
    ValueError
        The source lacks a UID needed for the derived UIDs, or the image
        does not match the source size or is not finite.
    """
    if not isinstance(source, Dataset):
        raise TypeError(f"source: expected a pydicom Dataset, got {type(source).__name__}")
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID"):
        if not source.get(keyword):
            raise ValueError(f"source: missing {keyword}")
    # Enhanced CT: frame by frame, written back as one Enhanced CT (see ldct_node.dicom.enhanced).
    multiframe = is_multiframe(source)
    if not model_version:
        raise ValueError("model_version: must not be empty")
    when = now or datetime.now()
    date, time, stamp = _dt_strings(when)

    # Both validate shape and finiteness.
    stored = (
        encode_frames_like(denoised_hu, source) if multiframe else encode_like(denoised_hu, source)
    )
    out = _copy_public(source)
    stored = _keep_padding(stored, source, out)

    # Identity: new series and instance, same study, frame of reference, geometry, patient.
    out.SeriesInstanceUID = derived_series_uid(
        str(source.SeriesInstanceUID), model_version, profile.name, dicom.uid_root
    )
    out.SOPInstanceUID = derived_sop_uid(
        str(source.SOPInstanceUID), model_version, profile.name, dicom.uid_root
    )
    out.SOPClassUID = source.SOPClassUID
    out.InstanceCreationDate = date
    out.InstanceCreationTime = time
    out.ContentDate = date
    out.ContentTime = time

    # ImageType: DERIVED\SECONDARY, later values (AXIAL, vendor values) kept.
    image_type = strings(source.get("ImageType"))
    out.ImageType = (
        derived_type(image_type) if multiframe else ["DERIVED", "SECONDARY", *image_type[2:]]
    )

    source_number = source.get("SeriesNumber")
    base_number = int(source_number) if source_number not in (None, "") else 0
    out.SeriesNumber = base_number + profile.series_number_offset
    out.SeriesDescription = _series_description(source, profile.series_description_suffix)

    # Derivation.
    fidelity = (
        f"; CT numbers kept on the input's above {profile.hu_fidelity_mm:g} mm"
        if profile.hu_fidelity_mm > 0
        else ""
    )
    description = (
        f"{algorithm}; model {model_version}; blend {profile.blend:g} "
        f"(output = (1 - blend) * denoised + blend * input){fidelity}; "
        f"{NODE_NAME} {__version__}"
    )
    previous = str(source.get("DerivationDescription", "") or "")
    if previous:
        description += f"; source derivation: {previous}"
    if multiframe:
        # Enhanced CT keeps derivation per frame (Derivation Image functional group).
        for keyword in ("DerivationDescription", "DerivationCodeSequence"):
            if keyword in out:
                delattr(out, keyword)
        mark_frames_derived(
            out,
            source,
            description=_fit(description, _ST_MAX),
            derivation_code=_code_item(CODE_SMOOTHING),
            purpose_code=_code_item(CODE_SOURCE_IMAGE),
        )
    else:
        out.DerivationDescription = _fit(description, _ST_MAX)
        out.DerivationCodeSequence = Sequence([_code_item(CODE_SMOOTHING)])
        reference = Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        reference.PurposeOfReferenceCodeSequence = Sequence([_code_item(CODE_SOURCE_IMAGE)])
        out.SourceImageSequence = Sequence([reference])

    related = Dataset()
    related.StudyInstanceUID = source.get("StudyInstanceUID", "")
    related.SeriesInstanceUID = source.SeriesInstanceUID
    related.PurposeOfReferenceCodeSequence = Sequence([_code_item(CODE_SOURCE_SERIES)])
    put_series_item(out, "RelatedSeriesSequence", related)

    # Equipment: the scanner stays the General Equipment; we are modifying equipment.
    versions = [_fit(f"{NODE_NAME} {__version__}", _LO_MAX)]
    versions.append(_fit(f"model {model_version}", _LO_MAX))
    equipment = Dataset()
    equipment.Manufacturer = NODE_NAME
    equipment.ManufacturerModelName = NODE_NAME
    equipment.SoftwareVersions = versions
    equipment.ContributionDateTime = stamp
    equipment.ContributionDescription = _fit(
        f"Denoised ({algorithm}, model {model_version}, blend {profile.blend:g})", _ST_MAX
    )
    equipment.PurposeOfReferenceCodeSequence = Sequence([_code_item(CODE_MODIFYING_EQUIPMENT)])
    previous_equipment = list(out.get("ContributingEquipmentSequence", None) or [])
    out.ContributingEquipmentSequence = Sequence([*previous_equipment, equipment])
    out.SoftwareVersions = versions

    if dicom.image_comments:
        out.ImageComments = _fit(dicom.image_comments, 10240)
    elif "ImageComments" in out:
        del out.ImageComments

    _lossy_history(source, out)
    _charset_for_new_text(out)
    # CT requires the rescale (type 1); where the source lacked it, encode_like used the
    # same defaults as decode_hu, so writing them keeps the HU meaning explicit.
    # (Enhanced CT carries its rescale per frame, in Pixel Value Transformation groups.)
    if "RescaleSlope" not in out and not multiframe:
        out.RescaleSlope = 1
    if "RescaleIntercept" not in out and not multiframe:
        out.RescaleIntercept = 0

    # Pixels: native little endian with the source's pixel format.
    out.PixelData = np.ascontiguousarray(stored).tobytes()
    out["PixelData"].VR = "OB" if int(source.get("BitsAllocated", 16)) <= 8 else "OW"
    out.file_meta = file_meta_for(out)
    return out


def write_derived(ds: Dataset, output_dir: Path) -> Path:
    """Write a derived instance durably as ``<output_dir>/<SOPInstanceUID>.dcm``.

    The file is written to a temporary name in ``output_dir``, fsynced and renamed, so a
    crash never leaves a partial file under the final name; rewriting is idempotent.
    """
    uid = str(ds.get("SOPInstanceUID", "") or "")
    if not uid or not UID(uid).is_valid:
        raise ValueError(f"ds: invalid SOPInstanceUID {uid!r}")
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        ds.file_meta = file_meta_for(ds)
    return save_durably(ds, Path(output_dir) / f"{uid}.dcm")
