"""The receiver's fast header read (ldct_node.dicom.header) against pydicom's full read.

Whatever the fast read answers must be what the receiver would have concluded from
pydicom's read of the same bytes; what it does not take (``None``) goes to pydicom.
"""

from __future__ import annotations

import contextlib
import random
import struct
import warnings
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from _dicom_util import make_ct_series
from _enhanced_util import write_enhanced_ct
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from ldct_node.config import OutputProfile, SeriesSettings
from ldct_node.dicom.header import header_tags, read_header
from ldct_node.dicom.io import processing_skip_reason, slice_position
from ldct_node.service import receive
from ldct_node.service.pdata import IncomingStore
from ldct_node.service.routing import matching_profiles

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
PROFILES = [
    OutputProfile(name="all"),
    OutputProfile(name="soft", convolution_kernels=["B30*"]),
    OutputProfile(name="chest", series_descriptions=["*chest*"]),
]


def split_part10(data: bytes) -> tuple[bytes, str, FileMetaDataset]:
    """(the data set's bytes, its transfer syntax, the file meta) of a Part 10 file."""
    meta = pydicom.dcmread(BytesIO(data), stop_before_pixels=True).file_meta
    group_length = struct.unpack_from("<I", data, 132 + 8)[0]
    return data[132 + 12 + group_length :], str(meta.TransferSyntaxUID), meta


def encoded(ds: Dataset, syntax: str) -> bytes:
    """``ds`` as a Part 10 file in ``syntax``."""
    ds = ds.copy()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    out = BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def incoming_of(data: bytes) -> IncomingStore:
    dataset, syntax, meta = split_part10(data)
    return IncomingStore(
        sop_class=str(meta.get("MediaStorageSOPClassUID", "")),
        sop_instance=str(meta.get("MediaStorageSOPInstanceUID", "")),
        transfer_syntax=syntax,
        dataset=dataset,
    )


def receiver_view(ds: Dataset) -> dict[str, Any]:
    """What the C-STORE handler concludes from a header (its fields, skip and routing)."""
    view: dict[str, Any] = {}
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID"):
        try:
            view[keyword] = receive._uid(ds, keyword)
        except receive._RefusedError as exc:
            view[keyword] = ("refused", exc.status)
    view["skip"] = processing_skip_reason(ds, SeriesSettings())
    view["profiles"] = [p.name for p in matching_profiles(ds, "SCANNER", PROFILES)]
    view["modality"] = str(ds.get("Modality", "") or "")
    view["instance"] = receive._optional_int(ds, "InstanceNumber")
    view["z"] = slice_position(ds)
    return view


def full_read(data: bytes) -> dict[str, Any] | tuple[str, int]:
    try:
        return receiver_view(receive._read_header(data))
    except receive._RefusedError as exc:
        return ("refused", exc.status)


def fast_read(data: bytes) -> dict[str, Any] | None:
    incoming = incoming_of(data)
    ds = read_header(incoming.dataset, incoming.transfer_syntax, receive._HEADER_TAGS)
    return None if ds is None else receiver_view(ds)


def ct_header(tmp_path: Path, **extra: object) -> Dataset:
    path = make_ct_series(tmp_path, n=1, size=16, extra=dict(extra) or None)[0]
    return pydicom.dcmread(path)


def with_sequences(ds: Dataset, *, undefined: bool) -> Dataset:
    """``ds`` with the sequences real headers carry: a nested one, an empty one, and
    ContributingEquipmentSequence naming another vendor."""
    inner = Dataset()
    inner.CodeValue = "113100"
    inner.CodingSchemeDesignator = "DCM"
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = "1.2.3.4.5"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    equipment = Dataset()
    equipment.Manufacturer = "Some Vendor"
    ds.ReferencedImageSequence = Sequence([item])
    ds.ContributingEquipmentSequence = Sequence([equipment])
    ds.RequestAttributesSequence = Sequence([])
    for elem in (ds["ReferencedImageSequence"], ds["ContributingEquipmentSequence"]):
        elem.is_undefined_length = undefined
        for each in elem.value:
            each.is_undefined_length_sequence_item = undefined
    return ds


def corpus(tmp_path: Path) -> list[tuple[str, bytes]]:
    """Headers of the kinds the receiver meets, each as explicit and implicit VR."""
    plain = ct_header(tmp_path / "a")
    localizer = ct_header(tmp_path / "b", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    own = ct_header(tmp_path / "c", SoftwareVersions=["ldct-node 9.9"])
    chest = ct_header(tmp_path / "d", SeriesDescription="Chest low dose", ConvolutionKernel="B30f")
    tilted = ct_header(tmp_path / "e", ImageOrientationPatient=[1, 0, 0, 0, 0.96, -0.28])
    items = {
        "plain": plain,
        "localizer": localizer,
        "own output": own,
        "chest B30f": chest,
        "tilted": tilted,
        "defined-length sequences": with_sequences(ct_header(tmp_path / "f"), undefined=False),
        "undefined-length sequences": with_sequences(ct_header(tmp_path / "g"), undefined=True),
    }
    out = []
    for name, ds in items.items():
        for syntax in (EXPLICIT, IMPLICIT):
            out.append(
                (f"{name}, {'implicit' if syntax == IMPLICIT else 'explicit'}", encoded(ds, syntax))
            )
    enhanced = write_enhanced_ct(
        np.zeros((3, 16, 16)), tmp_path / "enhanced.dcm", convolution_kernel="B30s"
    )
    out.append(("enhanced CT", enhanced.read_bytes()))
    return out


def test_the_fast_read_concludes_what_the_full_read_does(tmp_path: Path) -> None:
    cases = corpus(tmp_path)
    views = {}
    for name, data in cases:
        fast = fast_read(data)
        assert fast is not None, f"{name}: the fast read should take it"
        assert fast == full_read(data), name
        views[name] = fast
    # the corpus exercises what the receiver decides on
    assert views["localizer, explicit"]["skip"] == "image type LOCALIZER"
    assert views["own output, implicit"]["skip"] == "output of ldct-node (loop guard)"
    assert views["chest B30f, explicit"]["profiles"] == ["all", "soft", "chest"]
    assert views["enhanced CT"]["profiles"] == ["all", "soft"]
    assert views["plain, explicit"]["profiles"] == ["all"]
    assert None not in (views["tilted, implicit"]["z"], views["plain, implicit"]["z"])
    assert views["tilted, implicit"]["z"] != views["plain, implicit"]["z"]
    assert views["plain, explicit"]["skip"] is None


def test_the_receiver_reads_no_header_element_the_fast_read_leaves_out(tmp_path: Path) -> None:
    """Record every top-level element the handler's checks look up: each must be in
    receive._HEADER_TAGS, or the fast read would hide it from them."""
    looked_up: set[int] = set()

    class Recording(Dataset):
        def __getitem__(self, key: Any) -> Any:
            if not isinstance(key, slice):
                looked_up.add(int(Tag(key)))
            return super().__getitem__(key)

        def __contains__(self, name: object) -> bool:
            with contextlib.suppress(TypeError, ValueError, OverflowError):
                looked_up.add(int(Tag(name)))  # type: ignore[arg-type]
            return super().__contains__(name)

        def get_item(self, key: Any, *, keep_deferred: bool = False) -> Any:
            looked_up.add(int(Tag(key)))
            return super().get_item(key, keep_deferred=keep_deferred)

    for _name, data in corpus(tmp_path):
        full = receive._read_header(data)
        receiver_view(Recording(dict(full._dict)))
    missing = {f"{Tag(t)} {pydicom.datadict.keyword_for_tag(t)}" for t in looked_up}
    missing -= {f"{Tag(t)} {pydicom.datadict.keyword_for_tag(t)}" for t in receive._HEADER_TAGS}
    assert looked_up, "nothing recorded: the recording does not see the lookups"
    assert not missing, f"read by the receiver but not handed over by the fast read: {missing}"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mutated_headers_are_never_accepted_where_the_full_read_refuses(tmp_path: Path) -> None:
    """Bytes of the header changed at random (lengths, VRs, tags): where the fast read
    answers, the full read accepts the same bytes and concludes the same."""
    rng = random.Random(20261203)
    bases = [data for name, data in corpus(tmp_path) if "sequences" in name or "plain" in name]
    answered = declined = 0
    for i in range(400):
        base = bases[i % len(bases)]
        dataset, syntax, _ = split_part10(base)
        header_end = dataset.find(b"\xe0\x7f\x10\x00")
        mutated = bytearray(dataset)
        for _ in range(rng.choice((1, 1, 2, 3))):
            at = rng.randrange(0, header_end)
            mutated[at] = rng.randrange(256) if rng.random() < 0.7 else mutated[at] ^ 0x80
        meta_end = len(base) - len(dataset)
        data = base[:meta_end] + bytes(mutated)
        fast = read_header(bytes(mutated), syntax, receive._HEADER_TAGS)
        if fast is None:
            declined += 1
            continue
        answered += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about odd values it keeps
            expected = full_read(data)
        assert expected != ("refused", receive.CANNOT_UNDERSTAND), f"mutation {i}"
        assert receiver_view(fast) == expected, f"mutation {i}"
    # both outcomes happen, so the property was tested on both sides
    assert answered > 50 and declined > 50, (answered, declined)


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, vr, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


UIDS = _explicit(0x00080016, b"UI", b"1.2.840.10008.5.1.4.1.1.2\x00") + _explicit(
    0x00080018, b"UI", b"1.2.3.4\x00"
)


@pytest.mark.parametrize(
    ("name", "dataset", "syntax"),
    [
        ("big endian", UIDS, "1.2.840.10008.1.2.2"),
        ("deflated", UIDS, "1.2.840.10008.1.2.1.99"),
        ("unknown transfer syntax", UIDS, "1.2.3.4.5.6"),
        ("Rows (US) of 3 bytes", UIDS + _explicit(0x00280010, b"US", b"\x01\x02\x03"), EXPLICIT),
        ("an unknown VR", UIDS + _explicit(0x00200052, b"UF", b"\x01\x02"), EXPLICIT),
        ("tags out of order", _explicit(0x00200013, b"IS", b"1 ") + UIDS, EXPLICIT),
        ("a repeated tag", UIDS + _explicit(0x00080018, b"UI", b"1.2\x00"), EXPLICIT),
        ("a truncated value", UIDS + _explicit(0x00081030, b"LO", b"abcd")[:-2], EXPLICIT),
        ("trailing bytes", UIDS + b"\x08\x00\x30", EXPLICIT),
        ("a file meta element", _explicit(0x00020010, b"UI", b"1.2\x00") + UIDS, EXPLICIT),
        ("an item at the top level", UIDS + struct.pack("<HHI", 0xFFFE, 0xE000, 0), EXPLICIT),
        (
            "an undefined-length UN",
            UIDS + struct.pack("<HH2s2xI", 0x0009, 0x1010, b"UN", 0xFFFFFFFF),
            EXPLICIT,
        ),
        (
            "a sequence with a stray element instead of an item",
            UIDS + _explicit(0x00081140, b"SQ", _explicit(0x00081150, b"UI", b"1.2\x00")),
            EXPLICIT,
        ),
        (
            "an undefined-length sequence without its delimiter",
            UIDS
            + struct.pack("<HH2s2xI", 0x0008, 0x1140, b"SQ", 0xFFFFFFFF)
            + struct.pack("<HHI", 0xFFFE, 0xE000, 0),
            EXPLICIT,
        ),
        (
            "an ambiguous VR in implicit VR (SmallestImagePixelValue)",
            struct.pack("<HHI", 0x0008, 0x0016, 2)
            + b"1\x00"
            + struct.pack("<HHI", 0x0028, 0x0106, 2)
            + b"\x00\x00",
            IMPLICIT,
        ),
    ],
)
def test_what_the_fast_read_does_not_take_goes_to_pydicom(
    name: str, dataset: bytes, syntax: str
) -> None:
    assert read_header(dataset, syntax, receive._HEADER_TAGS) is None, name


def test_the_fast_read_stops_at_the_pixel_data_and_keeps_only_what_is_asked() -> None:
    pixel = struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OW", 0xFFFFFFFF)  # not even well formed
    tags = header_tags(["SOPInstanceUID"])
    ds = read_header(UIDS + _explicit(0x00100010, b"PN", b"Doe^Jane") + pixel, EXPLICIT, tags)
    assert ds is not None
    assert ds.SOPInstanceUID == "1.2.3.4"
    assert "PatientName" not in ds and "SOPClassUID" not in ds
    with pytest.raises(ValueError, match="keywords"):
        header_tags(["NoSuchKeyword"])
    with pytest.raises(TypeError, match="tags"):
        read_header(UIDS, EXPLICIT, {0x00080018})  # type: ignore[arg-type]


def test_the_handler_uses_the_fast_read_and_falls_back(tmp_path: Path) -> None:
    """receive._read_header: the fast read's Dataset for a plain header, pydicom's for
    one it does not take, and still 0xC210 for a value that cannot be decoded."""
    data = encoded(ct_header(tmp_path), EXPLICIT)
    incoming = incoming_of(data)
    fast = receive._read_header(data, incoming)
    assert "PatientName" not in fast and fast.SOPInstanceUID == incoming.sop_instance
    bad = (
        data[: len(data) - len(incoming.dataset)]
        + UIDS
        + _explicit(0x00280010, b"US", b"\x01\x02\x03")
    )
    with pytest.raises(receive._RefusedError) as info:
        receive._read_header(bad, incoming_of(bad))
    assert info.value.status == receive.CANNOT_UNDERSTAND
    unusual = data[: len(data) - len(incoming.dataset)] + _explicit(0x00200013, b"IS", b"7 ") + UIDS
    ds = receive._read_header(unusual, incoming_of(unusual))
    assert ds.InstanceNumber == 7 and ds.SOPInstanceUID == "1.2.3.4"
