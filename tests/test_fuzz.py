"""Fuzz: over a thousand mutated CT datasets sent through real associations to one
running ``ldct-node serve``.

Each example starts from a small valid slice (explicit or implicit VR, RLE, JPEG 2000,
JPEG lossless) in a series of its own and applies one to three mutations: truncated
or missing pixel data, wrong Rows/Columns, huge dimensions, bad BitsAllocated /
BitsStored / PixelRepresentation, missing or absurd rescale, elements re-encoded with
a wrong VR, deleted elements, corrupt or truncated compressed frames, colour or
multi-frame headers, other modalities, and random byte flips or truncation of the
encoded dataset. The bytes go out exactly as made (pynetdicom's chunked file mode).

Passing means: the node never dies; every C-STORE gets a response, success or a
failure status (never a crash of the handler, 0xC211); every acknowledged instance is
in the job table and its job ends ``done`` (the mutation was harmless) or ``failed``
with a reason that names the problem (never an "internal error"), or it is stored and
ignored (not for processing); and a valid series sent afterwards still completes.
The tally is printed (``pytest -s``).
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pynetdicom
import pytest
from _dicom_util import HAVE_DCMTK, compress, make_ct_series
from _net_util import scu_association
from _node_util import Serve, serving, wait_for, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import UID, generate_uid

from ldct_node.config import load_settings
from ldct_node.store import Database, JobState

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

CT = UID("1.2.840.10008.5.1.4.1.1.2")
N_EXAMPLES = 1000
#: Keywords worth breaking: those the receiver, the worker or the deriver read.
KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Modality",
    "ImageType", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation", "RescaleSlope",
    "RescaleIntercept", "PixelSpacing", "SliceThickness", "ImagePositionPatient",
    "ImageOrientationPatient", "InstanceNumber", "SeriesNumber", "SeriesDescription",
    "FrameOfReferenceUID", "PatientName", "PatientID", "WindowCenter", "PixelData",
    "ContributingEquipmentSequence", "SoftwareVersions", "DerivationDescription",
    "SourceImageSequence", "NumberOfFrames",
)  # fmt: skip
TERMINAL = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


def _syntaxes() -> dict[str, str]:
    names = {"explicit": "", "implicit": "implicit", "rle": "rle-pydicom", "j2k": "j2k-lossless"}
    if HAVE_DCMTK:
        names["jpeg-lossless"] = "jpeg-lossless"
    return names


# -- mutations: (name, parameters) tuples drawn by hypothesis, applied below ------------

byte_values = st.integers(0, 255)
mutation = st.one_of(
    st.tuples(st.just("truncate_pixels"), st.floats(0, 1)),
    st.tuples(st.just("drop_pixels"), st.none()),
    st.tuples(st.just("dims"), st.tuples(st.integers(0, 65535), st.integers(0, 65535))),
    st.tuples(st.just("dims_small"), st.tuples(st.integers(0, 64), st.integers(0, 64))),
    st.tuples(st.just("huge"), st.sampled_from([(65535, 65535), (4097, 4097), (65535, 1)])),
    st.tuples(
        st.just("bits"),
        st.tuples(
            st.sampled_from([0, 1, 7, 8, 12, 16, 24, 32, 64, 65535]),
            st.integers(0, 64),
            st.integers(0, 64),
            st.integers(0, 3),
        ),
    ),
    st.tuples(
        st.just("rescale"),
        st.sampled_from(
            ["drop-slope", "drop-intercept", "drop-both", "0", "-1", "1e308", "nan", "inf", "x"]
        ),
    ),
    st.tuples(
        st.just("wrong_vr"),
        st.tuples(
            st.sampled_from(KEYWORDS),
            st.sampled_from(["OB", "UN", "LO", "DS", "IS", "US", "UL", "FD", "SQ", "CS"]),
            st.binary(max_size=24),
        ),
    ),
    st.tuples(st.just("delete"), st.sampled_from(KEYWORDS)),
    st.tuples(
        st.just("frame"),
        st.tuples(
            st.sampled_from(["flip", "truncate", "random", "empty", "two-frames"]),
            st.lists(st.tuples(st.floats(0, 1), byte_values), min_size=1, max_size=8),
        ),
    ),
    st.tuples(
        st.just("header"),
        st.sampled_from(
            [
                ("SamplesPerPixel", 3),
                ("PhotometricInterpretation", "RGB"),
                ("PhotometricInterpretation", "PALETTE COLOR"),
                ("NumberOfFrames", "2"),
                ("NumberOfFrames", "999999999"),
                ("Modality", "MR"),
                ("ImageType", ["DERIVED", "SECONDARY"]),
                ("ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]),
                ("PlanarConfiguration", 1),
                ("SOPClassUID", "1.2.840.10008.5.1.4.1.1.4"),
            ]
        ),
    ),
    st.tuples(
        st.just("bytes"),
        st.lists(st.tuples(st.floats(0, 1), byte_values), min_size=1, max_size=16),
    ),
    st.tuples(st.just("cut"), st.floats(0, 1)),
)
mutations = st.lists(mutation, min_size=1, max_size=3)


def _value_for(vr: str, raw: bytes) -> Any:
    if vr in ("OB", "UN"):
        return raw
    if vr in ("US", "UL"):
        return int.from_bytes(raw[:2] or b"\x00", "little")
    if vr == "FD":
        return float(len(raw)) * -1.5
    if vr == "SQ":
        item = Dataset()
        item.CodeValue = raw.hex()[:16] or "0"
        return [item]
    return raw.decode("latin-1").replace("\\", "/")[:16]


def apply_dataset_mutation(ds: Dataset, name: str, arg: Any) -> None:
    """Mutate ``ds`` in place (element-level mutations)."""
    if name == "truncate_pixels" and "PixelData" in ds:
        ds.PixelData = ds.PixelData[: int(len(ds.PixelData) * arg)]
    elif name == "drop_pixels" and "PixelData" in ds:
        del ds.PixelData
    elif name in ("dims", "dims_small", "huge"):
        ds.Rows, ds.Columns = arg
    elif name == "bits":
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = arg
    elif name == "rescale":
        if arg.startswith("drop"):
            for keyword in ("RescaleSlope", "RescaleIntercept"):
                if (arg == "drop-both" or keyword.lower().endswith(arg[5:])) and keyword in ds:
                    delattr(ds, keyword)
        else:
            ds["RescaleSlope"] = DataElement(0x00281053, "DS", arg)
    elif name == "wrong_vr":
        keyword, vr, raw = arg
        tag = pydicom.datadict.tag_for_keyword(keyword)
        assert tag is not None
        ds[tag] = DataElement(tag, vr, _value_for(vr, raw))
    elif name == "delete" and arg in ds:
        delattr(ds, arg)
    elif name == "frame" and ds.file_meta.TransferSyntaxUID.is_encapsulated:
        how, edits = arg
        frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
        if how == "flip":
            for where, value in edits:
                frame[int(where * (len(frame) - 1))] = value
        elif how == "truncate":
            frame = frame[: int(edits[0][0] * len(frame))]
        elif how == "random":
            frame = bytearray(bytes(v for _, v in edits) * 16)
        elif how == "empty":
            frame = bytearray()
        frames = [bytes(frame)] * (2 if how == "two-frames" else 1)
        ds.PixelData = encapsulate(frames) if frames[0] else b"\xfe\xff\x00\xe0\x00\x00\x00\x00"
    elif name == "header":
        keyword, value = arg
        setattr(ds, keyword, value)


def apply_byte_mutation(data: bytes, name: str, arg: Any) -> bytes:
    """Mutate the encoded dataset bytes (after the file meta)."""
    if name == "bytes" and data:
        out = bytearray(data)
        for where, value in arg:
            out[int(where * (len(out) - 1))] = value
        return bytes(out)
    if name == "cut":
        return data[: int(len(data) * arg)]
    return data


def part10(ds: Dataset) -> tuple[bytes, bytes]:
    """(preamble + file meta, dataset bytes) of ``ds`` as pydicom encodes it."""
    with_meta = BytesIO()
    ds.save_as(with_meta, enforce_file_format=True)
    only_meta = BytesIO()
    empty = Dataset()
    empty.file_meta = ds.file_meta
    empty.save_as(only_meta, enforce_file_format=True)
    head = only_meta.getvalue()
    return head, with_meta.getvalue()[len(head) :]


@dataclass
class Sent:
    sop_instance_uid: str
    series_instance_uid: str
    mutations: list[tuple[str, Any]]
    status: int | None  # None: no response


class Sender:
    """One association kept open across examples; re-opened if the node dropped it."""

    def __init__(self, port: int, contexts: list[tuple[str, list[str]]]) -> None:
        self.port = port
        self.contexts = contexts
        self._cm: Any = None
        self.assoc: Any = None
        self.associations = 0

    def _open(self) -> None:
        self.close()
        self._cm = scu_association(self.port, self.contexts, calling_aet="FUZZER")
        self.assoc = self._cm.__enter__()
        self.associations += 1
        assert self.assoc.is_established, "the node refused an association"

    def send(self, path: Path) -> int | None:
        if self.assoc is None or not self.assoc.is_established:
            self._open()
        try:
            status = self.assoc.send_c_store(path)
        except RuntimeError:
            status = Dataset()
        if "Status" not in status:
            self._open()  # the node aborted the association: a new one for the next
            return None
        return int(status.Status)

    def close(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None
            self.assoc = None


@pytest.fixture
def fuzz_node(tmp_path: Path, untrained_weights: Path) -> Iterator[tuple[Serve, Database]]:
    config = write_config(
        tmp_path / "node",
        untrained_weights,
        series={"stable_seconds": 0.5},
        model={"batch_size": 4, "device": "cpu"},
    )
    settings = load_settings(config)
    with serving(config, settings.node.port) as serve:
        db = Database(settings.database_url)
        try:
            yield serve, db
        finally:
            db.close()


def test_a_thousand_mutated_datasets_never_kill_the_node(
    tmp_path: Path,
    fuzz_node: tuple[Serve, Database],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    serve, db = fuzz_node
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)

    (plain,) = make_ct_series(tmp_path, n=1, size=32, subdir="base")
    bases: dict[str, Dataset] = {}
    for name, syntax in _syntaxes().items():
        path = plain if not syntax else compress(plain, syntax, tmp_path / f"base-{name}.dcm")
        bases[name] = pydicom.dcmread(path)
    contexts = [(str(CT), [str(ds.file_meta.TransferSyntaxUID)]) for ds in bases.values()]
    sender = Sender(serve.port, contexts)
    counter = itertools.count()
    sent: list[Sent] = []
    scratch = tmp_path / "case.dcm"

    @settings(
        max_examples=N_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(base=st.sampled_from(sorted(bases)), edits=mutations)
    def send_one(base: str, edits: list[tuple[str, Any]]) -> None:
        k = next(counter)
        sop, series = generate_uid(), generate_uid()

        def fresh() -> Dataset:
            ds = copy.deepcopy(bases[base])
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.SeriesInstanceUID = series
            ds.InstanceNumber = k
            return ds

        try:
            ds = fresh()
            for name, arg in edits:
                apply_dataset_mutation(ds, name, arg)
            head, body = part10(ds)
        except Exception:  # pydicom cannot encode this mutation: send the bytes cut instead
            head, body = part10(fresh())
            body = body[: len(body) // 2]
        for name, arg in edits:
            body = apply_byte_mutation(body, name, arg)
        scratch.write_bytes(head + body)
        status = sender.send(scratch)
        sent.append(Sent(sop, series, edits, status))
        if k % 100 == 0:
            assert serve.alive(), f"node died at case {k}:\n{serve.log()[-3000:]}"

    try:
        send_one()
    finally:
        sender.close()
    assert serve.alive(), serve.log()[-3000:]

    statuses = Counter("none" if s.status is None else f"0x{s.status:04X}" for s in sent)
    assert len(sent) >= N_EXAMPLES
    # Every C-STORE was answered, and never by a crash of our handler.
    assert statuses["none"] == 0, [s for s in sent if s.status is None][:5]
    crashed = [s for s in sent if s.status == 0xC211]
    assert not crashed, f"{len(crashed)} handler crashes, e.g. {crashed[:3]}\n{serve.log()[-3000:]}"
    for s in sent:
        assert s.status is not None and (s.status == 0 or (s.status >> 12) in (0xA, 0xC)), s

    # Every acknowledged instance is recorded; its job (if any) ends with a clear outcome.
    def settled() -> bool:
        return not [j for j in db.list_jobs() if j.state not in TERMINAL]

    wait_for(settled, timeout=600, interval=0.5, what="every fuzz job to finish",
             details=lambda: serve.log()[-3000:])  # fmt: skip
    jobs = {j.series_instance_uid: j for j in db.list_jobs()}
    outcomes: Counter[str] = Counter()
    for s in sent:
        if s.status != 0:
            outcomes["refused"] += 1
            continue
        stored = db.instance_path(s.sop_instance_uid)
        if stored is None:  # the mutation changed the UIDs: recorded under the ones it had
            outcomes["stored under other UIDs"] += 1
            continue
        assert stored.is_file()
        job = jobs.get(s.series_instance_uid)
        if job is None:
            outcomes["stored, not for processing"] += 1
            continue
        assert job.state in (JobState.DONE, JobState.FAILED), (job, s.mutations)
        if job.state == JobState.FAILED:
            assert job.error, (job, s.mutations)
            assert "internal error" not in job.error, (job.error, s.mutations)
            assert s.sop_instance_uid in job.error or "re-send" in job.error.lower(), job.error
        outcomes[f"job {job.state}"] += 1
    assert outcomes["job failed"] > 0 and outcomes["refused"] > 0 and outcomes["job done"] > 0
    assert "Traceback" not in serve.log()

    # The node still works: a valid series afterwards completes.
    good = make_ct_series(tmp_path, n=3, size=32, subdir="good")
    uid = str(pydicom.dcmread(good[0], stop_before_pixels=True).SeriesInstanceUID)
    with scu_association(serve.port, [CT]) as assoc:
        assert all(assoc.send_c_store(p).Status == 0 for p in good)
    wait_for(
        lambda: (j := jobs_of(db, uid)) is not None and j.state == JobState.DONE,
        timeout=120,
        what="the valid series to complete",
        details=lambda: serve.log()[-3000:],
    )
    print(
        f"\nfuzz: {len(sent)} mutated datasets in {sender.associations} association(s); "
        f"C-STORE statuses {dict(statuses)}; outcomes {dict(outcomes)}"
    )


def jobs_of(db: Database, series_uid: str) -> Any:
    jobs = [j for j in db.list_jobs() if j.series_instance_uid == series_uid]
    return jobs[0] if jobs else None
