"""DICOM I/O: writing CT series, decoding every transfer syntax, grouping, eligibility."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from _dicom_util import (
    SYNTAXES,
    compress,
    corrupt_pixel_data_vr,
    dciodvfy_errors,
    hu_of,
    make_ct_series,
    make_ct_volume,
    needs_dciodvfy,
    needs_dcmtk,
)
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, generate_uid

from ldct_node.config import ENHANCED_CT_IMAGE_STORAGE, SeriesSettings
from ldct_node.dicom.io import (
    InputError,
    decode_hu,
    encode_like,
    processing_skip_reason,
    read_header,
    read_instance,
    scan_inputs,
    slice_position,
    write_ct_series,
)

# -- write_ct_series ---------------------------------------------------------------------


def test_write_ct_series_round_trip_and_geometry(tmp_path: Path) -> None:
    volume = make_ct_volume(3, 24, seed=1)
    volume[0, 0, 0] = -1024.4  # rounds to the stored value for air at the intercept
    volume[0, 0, 1] = 3071.49
    study, frame, series = generate_uid(), generate_uid(), generate_uid()
    paths = write_ct_series(
        volume,
        tmp_path / "out",
        pixel_spacing_mm=0.7,
        slice_thickness_mm=1.25,
        series_description="desc",
        series_number=7,
        study_uid=study,
        frame_of_reference_uid=frame,
        patient_name="Doe^Jane",
        patient_id="ID42",
        series_uid=series,
        start_z_mm=-10.0,
        extra={"KVP": 100, "BodyPartExamined": "ABDOMEN"},
    )
    assert [p.name for p in paths] == ["CT0001.dcm", "CT0002.dcm", "CT0003.dcm"]
    sop_uids = set()
    for i, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        assert np.abs(decode_hu(ds) - volume[i]).max() <= 0.5
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert (ds.StudyInstanceUID, ds.FrameOfReferenceUID) == (study, frame)
        assert ds.SeriesInstanceUID == series
        assert ds.InstanceNumber == i + 1
        assert float(ds.ImagePositionPatient[2]) == pytest.approx(-10.0 + 1.25 * i)
        assert float(ds.SliceLocation) == pytest.approx(-10.0 + 1.25 * i)
        assert [float(v) for v in ds.PixelSpacing] == [0.7, 0.7]
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert (ds.PixelRepresentation, ds.BitsStored, ds.BitsAllocated) == (1, 16, 16)
        assert (ds.Rows, ds.Columns) == (24, 24)
        assert ds.KVP == 100 and ds.BodyPartExamined == "ABDOMEN"  # extra wins
        assert (str(ds.PatientName), ds.PatientID) == ("Doe^Jane", "ID42")
        assert (ds.SeriesNumber, ds.SeriesDescription) == (7, "desc")
        sop_uids.add(ds.SOPInstanceUID)
    assert len(sop_uids) == 3


def test_write_ct_series_clips_to_stored_range(tmp_path: Path) -> None:
    volume = np.array([[[-40000.0, 40000.0]]], dtype=np.float32)
    paths = make_ct_series(tmp_path, volume_hu=volume)
    hu = hu_of(paths[0])
    assert hu.tolist() == [[-32768.0 - 1024.0, 32767.0 - 1024.0]]


def test_write_ct_series_rejects_bad_arguments(tmp_path: Path) -> None:
    good = make_ct_volume(1, 8)
    kwargs: dict[str, object] = {
        "pixel_spacing_mm": 1.0,
        "slice_thickness_mm": 1.0,
        "series_description": "",
        "series_number": 1,
        "study_uid": "1.2.3",
        "frame_of_reference_uid": "1.2.4",
        "patient_name": "",
        "patient_id": "",
    }
    with pytest.raises(ValueError, match="volume_hu"):
        write_ct_series(good[0], tmp_path, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="volume_hu"):
        write_ct_series(good * np.nan, tmp_path, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="extra"):
        write_ct_series(good, tmp_path, extra={"NotAKeyword": 1}, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pixel_spacing_mm"):
        write_ct_series(good, tmp_path, **{**kwargs, "pixel_spacing_mm": 0.0})  # type: ignore[arg-type]


@needs_dciodvfy
def test_write_ct_series_passes_dciodvfy(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path, n=2, size=16)
    for path in paths:
        assert dciodvfy_errors(path) == []


# -- decode_hu / encode_like -------------------------------------------------------------


@needs_dcmtk
@pytest.mark.parametrize("syntax", sorted(SYNTAXES))
def test_decode_every_transfer_syntax(tmp_path: Path, syntax: str) -> None:
    path = make_ct_series(tmp_path, n=1, size=32, seed=3)[0]
    reference = hu_of(path)
    encoded = compress(path, syntax)
    ds = pydicom.dcmread(encoded)
    assert ds.file_meta.TransferSyntaxUID == SYNTAXES[syntax]
    hu = decode_hu(ds)
    assert hu.dtype == np.float32
    np.testing.assert_array_equal(hu, reference)


def test_decode_jpeg2000_lossless_matches_uncompressed_real_ct() -> None:
    j2k = get_testdata_file("693_J2KR.dcm")
    raw = get_testdata_file("693_UNCR.dcm")
    if j2k is None or raw is None:
        pytest.skip("pydicom-data test files not installed")
    ds_j2k, ds_raw = pydicom.dcmread(j2k), pydicom.dcmread(raw)
    assert ds_j2k.file_meta.TransferSyntaxUID == JPEG2000Lossless
    hu_j2k, hu_raw = decode_hu(ds_j2k), decode_hu(ds_raw)
    assert hu_j2k.shape == (512, 512)
    np.testing.assert_array_equal(hu_j2k, hu_raw)
    assert -1100 < float(np.median(hu_raw)) < 200  # plausible HU, i.e. rescale applied


def test_decode_applies_rescale_and_defaults_without_it(tmp_path: Path) -> None:
    path = make_ct_series(tmp_path, n=1, size=8)[0]
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array.astype(np.float32)
    np.testing.assert_array_equal(decode_hu(ds), stored - 1024.0)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -10
    np.testing.assert_array_equal(decode_hu(ds), stored * 2 - 10)
    del ds.RescaleSlope
    del ds.RescaleIntercept
    np.testing.assert_array_equal(decode_hu(ds), stored)


def test_decode_rejects_corrupt_and_unsupported_pixel_data(tmp_path: Path) -> None:
    path = make_ct_series(tmp_path, n=1, size=16)[0]

    short = pydicom.dcmread(path)
    short.PixelData = short.PixelData[:100]
    with pytest.raises(InputError):
        decode_hu(short)

    for rows in (32, 8):  # pixel data holds 16 x 16: too little, too much
        wrong_size = pydicom.dcmread(path)
        wrong_size.Rows = rows
        with pytest.raises(InputError, match="bytes"):
            decode_hu(wrong_size)

    garbage = pydicom.dcmread(path)
    garbage.file_meta.TransferSyntaxUID = JPEG2000Lossless
    garbage.PixelData = encapsulate([b"\x00\x01not a jpeg 2000 codestream" * 4])
    with pytest.raises(InputError, match="cannot decode"):
        decode_hu(garbage)

    multi = pydicom.dcmread(path)
    multi.NumberOfFrames = 2
    multi.PixelData = multi.PixelData * 2
    with pytest.raises(InputError, match="multi-frame"):
        decode_hu(multi)

    header_only = pydicom.dcmread(path, stop_before_pixels=True)
    with pytest.raises(InputError, match="no pixel data"):
        decode_hu(header_only)


def test_a_pixel_data_element_with_a_corrupt_vr_is_an_input_error(tmp_path: Path) -> None:
    """The receiver reads the header up to the pixel data, so a flipped byte in the
    PixelData element's VR reaches the worker: an input error that says so, not pydicom's
    NotImplementedError (which the worker would report as an internal error)."""
    path = corrupt_pixel_data_vr(make_ct_series(tmp_path, n=1, size=16)[0])
    ds = read_instance(path)  # the header is fine
    assert ds.Rows == 16
    with pytest.raises(InputError, match=r"pixel data element cannot be read .*Value Repr"):
        decode_hu(ds)


def _header(bits_stored: int, signed: bool, slope: float = 1.0, intercept: float = 0.0) -> Dataset:
    ds = Dataset()
    ds.Rows, ds.Columns = 1, 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    return ds


def test_encode_like_clips_to_stored_range() -> None:
    hu = np.array([[-1e6, -1024.0, 3071.0, 1e6]])
    unsigned12 = encode_like(hu, _header(12, signed=False, intercept=-1024))
    assert unsigned12.dtype == np.dtype("<u2")
    assert unsigned12.tolist() == [[0, 0, 4095, 4095]]
    signed16 = encode_like(hu, _header(16, signed=True, intercept=-1024))
    assert signed16.dtype == np.dtype("<i2")
    assert signed16.tolist() == [[-32768, 0, 4095, 32767]]
    signed12 = encode_like(hu, _header(12, signed=True, intercept=0))
    assert signed12.tolist() == [[-2048, -1024, 2047, 2047]]


def test_encode_like_inverts_decode_with_rounding() -> None:
    ds = _header(16, signed=True, slope=0.5, intercept=-1000)
    hu = np.array([[-1000.0, -999.74, 0.26, 123.4]])
    stored = encode_like(hu, ds)
    assert stored.tolist() == [[0, 1, 2001, 2247]]
    back = stored.astype(np.float64) * 0.5 - 1000
    assert np.abs(back - hu).max() <= 0.25 + 1e-9


def test_encode_like_rejects_bad_input() -> None:
    ds = _header(16, signed=True)
    with pytest.raises(ValueError, match="shape"):
        encode_like(np.zeros((2, 4)), ds)
    with pytest.raises(ValueError, match="NaN"):
        encode_like(np.array([[0.0, np.nan, 0.0, 0.0]]), ds)


# -- scan_inputs -------------------------------------------------------------------------


def _shuffle_names(paths: list[Path], folder: Path, prefix: str, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    order = list(range(len(paths)))
    random.Random(seed).shuffle(order)
    for path, k in zip(paths, order, strict=True):
        shutil.move(path, folder / f"{prefix}{k:03d}")  # names unrelated to position


def test_scan_groups_interleaved_series_and_sorts_by_position(tmp_path: Path) -> None:
    study = generate_uid()
    a = make_ct_series(tmp_path, n=5, size=8, study_uid=study, subdir="a", start_z_mm=50.0)
    # Series b: InstanceNumber runs against position, so only geometry sorts it right.
    b = make_ct_series(tmp_path, n=4, size=8, study_uid=study, subdir="b", seed=2)
    for path in b:
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = 100 - int(ds.InstanceNumber)
        ds.save_as(path)
    expected = {
        pydicom.dcmread(a[0]).SeriesInstanceUID: [pydicom.dcmread(p).SOPInstanceUID for p in a],
        pydicom.dcmread(b[0]).SeriesInstanceUID: [pydicom.dcmread(p).SOPInstanceUID for p in b],
    }
    mixed = tmp_path / "mixed"
    _shuffle_names(a + b, mixed / "deep" / "er", "x", seed=5)

    result = scan_inputs([mixed])
    assert result.problems == []
    assert {g.series_uid for g in result.series} == set(expected)
    for group in result.series:
        assert [ds.SOPInstanceUID for _, ds in group.instances] == expected[group.series_uid]
        assert group.study_uid == study
        assert group.modality == "CT"
        assert group.n_instances == len(expected[group.series_uid])
        assert all("PixelData" not in ds for _, ds in group.instances)  # headers only
        zs = [slice_position(ds) or 0.0 for _, ds in group.instances]
        assert zs == sorted(zs) and len(set(zs)) == len(zs)


def test_scan_sorts_sagittal_series_along_its_normal(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path, n=4, size=8)
    uids = []
    for i, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        # Row +y, column -z: the normal (row x column) is -x, so the order runs to -x.
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [-10.0 * i, 5.0, -3.0 * i]  # z runs the other way
        ds.InstanceNumber = 1
        ds.save_as(path)
        uids.append(ds.SOPInstanceUID)
    _shuffle_names(paths, tmp_path / "s", "f", seed=1)
    (group,) = scan_inputs([tmp_path / "s"]).series
    assert [ds.SOPInstanceUID for _, ds in group.instances] == uids


def test_scan_falls_back_to_instance_number_then_file_name(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path, n=3, size=8)
    for path, number in zip(paths, (3, 1, 2), strict=True):
        ds = pydicom.dcmread(path)
        del ds.ImagePositionPatient
        ds.InstanceNumber = number
        ds.save_as(path)
    (group,) = scan_inputs(paths).series
    assert [int(ds.InstanceNumber) for _, ds in group.instances] == [1, 2, 3]

    for path in paths:
        ds = pydicom.dcmread(path)
        del ds.InstanceNumber
        ds.save_as(path)
    (group,) = scan_inputs(list(reversed(paths))).series
    assert [p.name for p in group.paths] == ["CT0001.dcm", "CT0002.dcm", "CT0003.dcm"]


def test_without_orientation_denoise_and_the_receiver_order_by_z_alike(tmp_path: Path) -> None:
    """One ordering rule (issue 16): an instance with a position but no
    ImageOrientationPatient is placed by its z, in ``denoise`` (scan_inputs) and in the
    receiver's job table (the same slice_position), whatever InstanceNumber says."""
    from ldct_node.service import receive

    paths = make_ct_series(tmp_path, n=3, size=8)
    uids = []
    for path, z, number in zip(paths, (20.0, -5.0, 7.5), (1, 2, 3), strict=True):
        ds = pydicom.dcmread(path)
        del ds.ImageOrientationPatient
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.InstanceNumber = number
        ds.save_as(path)
        uids.append((z, str(ds.SOPInstanceUID)))
    (group,) = scan_inputs(paths).series
    assert [str(ds.SOPInstanceUID) for _, ds in group.instances] == [u for _, u in sorted(uids)]
    assert receive.slice_position is slice_position
    assert [slice_position(ds) for _, ds in group.instances] == [-5.0, 7.5, 20.0]


def test_scan_reports_problems_and_skips_hidden_files(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path, n=3, size=16, subdir="in")
    folder = paths[0].parent
    (folder / "notes.txt").write_text("not dicom")
    (folder / "empty.dcm").write_bytes(b"")
    data = paths[2].read_bytes()
    truncated = folder / "truncated.dcm"
    truncated.write_bytes(data[: len(data) - 200])  # cut inside the pixel data
    (folder / "header_cut.dcm").write_bytes(data[:400])  # cut inside the header
    hidden = folder / ".hidden"
    hidden.mkdir()
    shutil.copy(paths[0], hidden / "copy.dcm")
    shutil.copy(paths[0], folder / ".dotfile.dcm")

    result = scan_inputs([folder, tmp_path / "missing"])
    (group,) = result.series
    assert group.n_instances == 3  # hidden copies neither counted nor duplicated
    bad = {p.path.name: p.reason for p in result.problems}
    assert set(bad) == {"notes.txt", "empty.dcm", "truncated.dcm", "header_cut.dcm", "missing"}
    assert "truncated" in bad["truncated.dcm"]
    assert "no such file" in bad["missing"]


def test_scan_detects_truncated_encapsulated_pixel_data(tmp_path: Path) -> None:
    path = make_ct_series(tmp_path, n=1, size=32)[0]
    rle = compress(path, "rle-pydicom")
    assert read_header(rle).SOPInstanceUID
    data = rle.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:-20])
    with pytest.raises(InputError, match="truncated"):
        read_header(cut)


def test_scan_accepts_files_without_preamble_and_drops_duplicates(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path, n=2, size=8, subdir="in")
    bare = tmp_path / "in" / "bare.dcm"
    ds = pydicom.dcmread(paths[0])
    ds.InstanceNumber = 9
    ds.ImagePositionPatient = [0, 0, 99]
    ds.SOPInstanceUID = generate_uid()
    ds.preamble = None
    del ds.file_meta
    ds.save_as(bare, implicit_vr=False, little_endian=True)  # no preamble, no file meta
    assert b"DICM" not in bare.read_bytes()[:200]
    duplicate = tmp_path / "in" / "zz_duplicate.dcm"
    shutil.copy(paths[1], duplicate)

    result = scan_inputs([tmp_path / "in"])
    assert result.problems == []
    (group,) = result.series
    assert group.n_instances == 3
    assert group.paths[-1] == bare
    assert duplicate not in group.paths


@pytest.mark.parametrize("implicit", [True, False])
def test_truncated_file_without_preamble_is_detected(tmp_path: Path, implicit: bool) -> None:
    ds = pydicom.dcmread(make_ct_series(tmp_path, n=1, size=16)[0])
    ds.preamble = None
    del ds.file_meta
    bare = tmp_path / "bare.dcm"
    ds.save_as(bare, implicit_vr=implicit, little_endian=True)
    assert read_header(bare).SOPInstanceUID == ds.SOPInstanceUID
    np.testing.assert_array_equal(decode_hu(read_instance(bare)), decode_hu(ds))
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(bare.read_bytes()[:-10])
    with pytest.raises(InputError, match="truncated"):
        read_header(cut)
    with pytest.raises(InputError, match="truncated"):
        read_instance(cut)


def test_scan_rejects_single_path_argument(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="paths"):
        scan_inputs(tmp_path)  # type: ignore[arg-type]


# -- processing_skip_reason --------------------------------------------------------------


@pytest.fixture
def ct_header(tmp_path: Path) -> Dataset:
    return pydicom.dcmread(make_ct_series(tmp_path, n=1, size=8)[0], stop_before_pixels=True)


def test_skip_reason_none_for_original_ct(ct_header: Dataset) -> None:
    assert processing_skip_reason(ct_header, SeriesSettings()) is None


def test_skip_reason_sop_class(ct_header: Dataset) -> None:
    ct_header.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    reason = processing_skip_reason(ct_header, SeriesSettings())
    assert reason is not None and "SOP class" in reason
    settings = SeriesSettings(accept_sop_classes=[ENHANCED_CT_IMAGE_STORAGE])
    assert processing_skip_reason(ct_header, settings) is None


def test_skip_reason_modality(ct_header: Dataset) -> None:
    ct_header.Modality = "MR"
    reason = processing_skip_reason(ct_header, SeriesSettings())
    assert reason is not None and "MR" in reason


def test_skip_reason_localizer(ct_header: Dataset) -> None:
    ct_header.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    reason = processing_skip_reason(ct_header, SeriesSettings())
    assert reason is not None and "LOCALIZER" in reason
    assert processing_skip_reason(ct_header, SeriesSettings(skip_image_types=[])) is None


def test_skip_reason_derived_only_when_ignored(ct_header: Dataset) -> None:
    ct_header.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    reason = processing_skip_reason(ct_header, SeriesSettings())
    assert reason is not None and "DERIVED" in reason
    assert processing_skip_reason(ct_header, SeriesSettings(ignore_derived=False)) is None


@pytest.mark.parametrize("marker", ["equipment", "software", "description"])
def test_skip_reason_own_output_even_when_derived_allowed(ct_header: Dataset, marker: str) -> None:
    if marker == "equipment":
        item = Dataset()
        item.Manufacturer = "ldct-node"
        ct_header.ContributingEquipmentSequence = [item]
    elif marker == "software":
        ct_header.SoftwareVersions = ["VA40", "ldct-node 0.1.0"]
    else:
        ct_header.DerivationDescription = "Denoised by LDCT-NODE"
    reason = processing_skip_reason(ct_header, SeriesSettings(ignore_derived=False))
    assert reason is not None and "loop" in reason


@needs_dciodvfy
def test_write_ct_series_keeps_decimal_strings_within_16_chars(tmp_path: Path) -> None:
    paths = make_ct_series(
        tmp_path, n=2, size=32, pixel_spacing_mm=0.7031249999, start_z_mm=-12.3456789012345
    )
    ds = pydicom.dcmread(paths[1])
    for value in [*ds.PixelSpacing, *ds.ImagePositionPatient, ds.SliceLocation]:
        assert len(str(value.original_string if hasattr(value, "original_string") else value)) <= 16
    assert dciodvfy_errors(paths[1]) == []
