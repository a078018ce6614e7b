"""A received data set's header, read straight from its bytes for the common encodings.

The receiver needs a dozen header elements of every instance and must refuse one whose
values cannot be decoded. pydicom's ``dcmread`` builds an object for every element
first, and that was most of the receiver's CPU time per instance (1.05 of 5 ms on the
2-core AMX Xeon). :func:`read_header` walks the elements itself, checks each one as
the receiver's full check would need, and hands pydicom only the elements asked for, as
the raw elements pydicom itself makes, so their values decode exactly as before.

It answers only when the data set is plainly well formed: Explicit or Implicit VR
Little Endian, lengths that fit, tags in ascending order, known VRs, binary numbers
whose length is a whole number of values, sequences whose items and delimiters nest
correctly. For anything else it returns ``None`` and the caller reads the data set
with pydicom, which then decides (accepts, or refuses what cannot be decoded). So this
path never accepts what the full read would refuse.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, MutableMapping
from typing import cast

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pydicom.valuerep import STR_VR

__all__ = ["VRS_THAT_ALWAYS_DECODE", "HeaderTags", "header_tags", "read_header"]

#: Pixel data tags: the read stops at the first (as ``stop_before_pixels`` does).
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
#: Deeper nesting than this is left to pydicom (no real header comes near it).
_MAX_DEPTH = 16

#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS = frozenset(
    {
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO",
        b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    }
)  # fmt: skip
#: VRs whose values are unpacked as fixed-size binary numbers, and that size: a length
#: that is not a whole number of values is the one way their decoding fails.
_NUMBER_SIZES = {
    "AT": 4, "FD": 8, "FL": 4, "OD": 8, "OF": 4, "OL": 4, "OV": 8,
    "SL": 4, "SS": 2, "SV": 8, "UL": 4, "US": 2, "UV": 8,
}  # fmt: skip
#: VRs whose values pydicom keeps as text (its ``STR_VR``) or as plain bytes: decoding
#: them never fails (invalid text is kept with a warning). Every other VR (numbers
#: unpacked as fixed-size items, whose length may not fit, OD/OF/OL/OV among them;
#: sequences; ambiguous or unknown VRs) may. The receiver's full read uses it too.
VRS_THAT_ALWAYS_DECODE = frozenset(STR_VR) | {"OB", "OW", "UN"}

_EXPLICIT = struct.Struct("<HH2sH")
_IMPLICIT = struct.Struct("<HHL")
_LONG_LENGTH = struct.Struct("<L")


class _LeftToPydicomError(Exception):
    """Something this reader leaves to pydicom."""


class HeaderTags(frozenset[int]):
    """The top-level tags a caller reads from the header (see :func:`header_tags`)."""


def header_tags(keywords: Iterable[str]) -> HeaderTags:
    """The tags of ``keywords`` (DICOM dictionary names), plus Specific Character Set,
    which text values need to decode."""
    from pydicom.datadict import tag_for_keyword

    tags = {0x00080005}
    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise ValueError(f"keywords: {keyword!r} is not a DICOM keyword")
        tags.add(tag)
    return HeaderTags(tags)


@functools.lru_cache(maxsize=64)
def _implicit_vr(transfer_syntax: str) -> bool | None:
    """True/False for Implicit/Explicit VR Little Endian data sets; None for the rest
    (big endian, deflated, unknown transfer syntaxes)."""
    uid = UID(transfer_syntax)
    if not uid.is_transfer_syntax or uid.is_deflated or not uid.is_little_endian:
        return None
    return bool(uid.is_implicit_VR)


def read_header(dataset: bytes, transfer_syntax: str, tags: HeaderTags) -> Dataset | None:
    """The top-level elements ``tags`` of ``dataset`` (the bytes after the file meta),
    up to the pixel data, as a pydicom Dataset; ``None`` when the data set is not one
    this reader takes (the caller then reads it with pydicom).

    Parameters
    ----------
    dataset
        The data set as received, encoded in ``transfer_syntax``.
    transfer_syntax
        The negotiated transfer syntax UID.
    tags
        What to keep (:func:`header_tags`); every element is checked all the same.
    """
    if not isinstance(tags, HeaderTags):
        raise TypeError(f"tags: expected HeaderTags (header_tags()), got {type(tags).__name__}")
    implicit = _implicit_vr(transfer_syntax)
    if implicit is None:
        return None
    try:
        kept = _top_level(memoryview(dataset), implicit, tags)
    except _LeftToPydicomError:  # every read is bounds-checked before it unpacks
        return None
    ds = Dataset(kept)
    ds.set_original_encoding(implicit, True)
    return ds


def _top_level(
    data: memoryview, implicit: bool, tags: HeaderTags
) -> MutableMapping[BaseTag, DataElement | RawDataElement]:
    kept: dict[BaseTag, DataElement | RawDataElement] = {}
    end = len(data)
    pos = 0
    previous = -1
    while pos < end:
        tag, vr, length, start = _element_header(data, pos, end, implicit)
        if tag in _PIXEL_TAGS:
            break
        # Group 0002 and lower belong to the file meta or a command set; items and
        # delimiters only inside sequences; repeated or unordered tags: pydicom decides.
        if tag <= previous or tag < 0x00080000 or tag >> 16 == 0xFFFE:
            raise _LeftToPydicomError
        previous = tag
        if implicit:
            vr = _dictionary_vr(tag)
        if length == _UNDEFINED:
            if vr != "SQ":
                raise _LeftToPydicomError  # an undefined-length non-sequence (UN or other)
            content_end, pos = _undefined_sequence(data, start, end, implicit, 1)
        else:
            content_end = pos = start + length
            if pos > end:
                raise _LeftToPydicomError  # truncated
            _check_value(data, start, content_end, vr, implicit)
        if tag in tags:
            raw_length = content_end - start
            value = (
                bytes(data[start:content_end])
                if raw_length  # else the empty value pydicom's own reader gives
                else cast(bytes | None, empty_value_for_VR(None if implicit else vr, raw=True))
            )
            kept[BaseTag(tag)] = RawDataElement(
                BaseTag(tag),
                None if implicit else vr,
                raw_length,
                value,
                start,
                implicit,
                True,
            )
    return kept


def _element_header(
    data: memoryview, pos: int, end: int, implicit: bool
) -> tuple[int, str | None, int, int]:
    """(tag, VR or None when implicit, length, where the value starts)."""
    if pos + 8 > end:
        raise _LeftToPydicomError
    if implicit:
        group, element, length = _IMPLICIT.unpack_from(data, pos)
        return group << 16 | element, None, length, pos + 8
    group, element, vr_bytes, length = _EXPLICIT.unpack_from(data, pos)
    tag = group << 16 | element
    if group == 0xFFFE:  # items and delimiters carry no VR
        return tag, None, _IMPLICIT.unpack_from(data, pos)[2], pos + 8
    if vr_bytes in _LONG_VRS:
        if pos + 12 > end:
            raise _LeftToPydicomError
        return tag, vr_bytes.decode(), _LONG_LENGTH.unpack_from(data, pos + 8)[0], pos + 12
    if vr_bytes in _SHORT_VRS:
        return tag, vr_bytes.decode(), length, pos + 8
    raise _LeftToPydicomError  # unknown VR (or implicit VR where explicit was negotiated)


@functools.lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str:
    """The dictionary VR of an implicit VR element; private or unknown tags are UN
    (kept as bytes, as pydicom does). Ambiguous VRs (``US or SS``...) need pydicom's
    rules: left to it."""
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    if " " in vr:
        raise _LeftToPydicomError
    return vr


def _check_value(data: memoryview, start: int, end: int, vr: str | None, implicit: bool) -> None:
    """Raise :class:`_LeftToPydicomError` unless the value of a top-level element decodes."""
    if vr in VRS_THAT_ALWAYS_DECODE:
        return
    if vr == "SQ":
        _defined_sequence(data, start, end, implicit, 1)
        return
    size = _NUMBER_SIZES.get(vr or "")
    if size is None or (end - start) % size:
        raise _LeftToPydicomError


def _defined_sequence(data: memoryview, pos: int, end: int, implicit: bool, depth: int) -> None:
    """Walk the items of a sequence whose content is ``data[pos:end]``."""
    while pos < end:
        pos = _item(data, pos, end, implicit, depth)
    if pos != end:
        raise _LeftToPydicomError


def _undefined_sequence(
    data: memoryview, pos: int, end: int, implicit: bool, depth: int
) -> tuple[int, int]:
    """Walk the items of an undefined-length sequence from ``pos``: (where its content
    ends, where the element after its delimiter starts)."""
    while True:
        tag, _vr, length, start = _element_header(data, pos, end, True)
        if tag == _SEQUENCE_END:
            if length != 0:
                raise _LeftToPydicomError
            return pos, start
        pos = _item(data, pos, end, implicit, depth)


def _item(data: memoryview, pos: int, end: int, implicit: bool, depth: int) -> int:
    """Walk one item from ``pos``; where the next one starts."""
    if depth > _MAX_DEPTH:
        raise _LeftToPydicomError
    tag, _vr, length, start = _element_header(data, pos, end, True)
    if tag != _ITEM:
        raise _LeftToPydicomError
    if length == _UNDEFINED:
        return _nested(data, start, end, implicit, depth, until_delimiter=True)
    item_end = start + length
    if item_end > end:
        raise _LeftToPydicomError
    if _nested(data, start, item_end, implicit, depth, until_delimiter=False) != item_end:
        raise _LeftToPydicomError
    return item_end


def _nested(
    data: memoryview, pos: int, end: int, implicit: bool, depth: int, *, until_delimiter: bool
) -> int:
    """Walk the elements of an item (values are decoded only when read, so only their
    structure matters here); where the item ends."""
    while pos < end:
        tag, vr, length, start = _element_header(data, pos, end, implicit)
        if tag == _ITEM_END:
            if not until_delimiter or length != 0:
                raise _LeftToPydicomError
            return start
        if tag >> 16 == 0xFFFE:
            raise _LeftToPydicomError
        if implicit:
            vr = _dictionary_vr(tag)
        if length == _UNDEFINED:
            if vr != "SQ":
                raise _LeftToPydicomError
            _, pos = _undefined_sequence(data, start, end, implicit, depth + 1)
            continue
        pos = start + length
        if pos > end:
            raise _LeftToPydicomError
        if vr == "SQ":
            _defined_sequence(data, start, pos, implicit, depth + 1)
    if until_delimiter:
        raise _LeftToPydicomError  # no item delimiter before the end
    return pos
