"""The derived-series factory: every rule of ldct_node.dicom.derive, one test each."""

from __future__ import annotations

import copy
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from _dicom_util import compress, dciodvfy_errors, make_ct_series, needs_dciodvfy
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import PYDICOM_ROOT_UID, UID, ExplicitVRLittleEndian, JPEGBaseline8Bit

from ldct_node import __version__
from ldct_node.config import DicomSettings, OutputProfile, SeriesSettings
from ldct_node.dicom.derive import (
    derive_instance,
    derived_series_uid,
    derived_sop_uid,
    derived_uid,
    write_derived,
)
from ldct_node.dicom.io import decode_hu, processing_skip_reason

NOW = datetime(2024, 5, 6, 7, 8, 9, 123456)
PROFILE = OutputProfile(
    name="soft", blend=0.3, series_description_suffix=" [LDCT denoised]", series_number_offset=1000
)
DICOM = DicomSettings(uid_root="1.2.3.4.", image_comments="Denoised; check before use")


@pytest.fixture
def source(tmp_path: Path) -> Dataset:
    path = make_ct_series(
        tmp_path,
        n=2,
        size=16,
        series_number=3,
        series_description="Chest LD",
        extra={
            "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL", "CT_SOM5 SPI"],
            "KVP": 100,
            "ExposureTime": 500,
            "XRayTubeCurrent": 40,
            "ConvolutionKernel": "B30f",
            "AccessionNumber": "ACC1",
            "PatientBirthDate": "19700101",
            "PatientSex": "F",
            "SmallestImagePixelValue": 0,
            "LargestImagePixelValue": 1000,
            "ImageComments": "scanner comment",
        },
    )[1]
    ds = pydicom.dcmread(path)
    block = ds.private_block(0x0029, "VENDOR X", create=True)
    block.add_new(0x10, "LO", "secret")
    icon = Dataset()
    icon.Rows = 1
    ds.IconImageSequence = [icon]
    ds.add_new(0x60000010, "US", 16)  # overlay rows
    ds.add_new(0x60003000, "OW", b"\x00" * 32)  # overlay data
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    item.add_new(0x00091010, "LO", "private in item")
    ds.ReferencedImageSequence = [item]
    return ds


def _derive(ds: Dataset, hu: np.ndarray | None = None, **kwargs: object) -> Dataset:
    image = decode_hu(ds) - 10.0 if hu is None else hu
    args: dict[str, object] = {"profile": PROFILE, "model_version": "w1", "dicom": DICOM}
    args.update(kwargs)
    return derive_instance(ds, image, now=NOW, **args)  # type: ignore[arg-type]


def _code(seq_item: Dataset) -> tuple[str, str, str]:
    return (seq_item.CodeValue, seq_item.CodingSchemeDesignator, seq_item.CodeMeaning)


# -- UIDs --------------------------------------------------------------------------------


def test_derived_uids_are_deterministic_and_distinct() -> None:
    s = derived_series_uid("1.2.840.1", "w1", "soft", "1.2.3.4.")
    assert s == derived_series_uid("1.2.840.1", "w1", "soft", "1.2.3.4.")
    assert s.startswith("1.2.3.4.") and UID(s).is_valid and len(s) <= 64
    i = derived_sop_uid("1.2.840.1", "w1", "soft", "1.2.3.4.")
    assert i == derived_sop_uid("1.2.840.1", "w1", "soft", "1.2.3.4.")
    assert i != s  # series and instance never share a UID, even from the same source UID
    others = {
        derived_series_uid("1.2.840.1", "w2", "soft", "1.2.3.4."),
        derived_series_uid("1.2.840.1", "w1", "hard", "1.2.3.4."),
        derived_series_uid("1.2.840.2", "w1", "soft", "1.2.3.4."),
    }
    assert s not in others and len(others) == 3
    assert derived_sop_uid("1.2.840.1", "w2", "soft", "1.2.3.4.") != i
    assert derived_sop_uid("1.2.840.1", "w1", "hard", "1.2.3.4.") != i


def test_derived_uid_parts_are_unambiguous_and_root_defaults_to_pydicom() -> None:
    assert derived_uid("1.2.", "ab", "c") != derived_uid("1.2.", "a", "bc")
    assert derived_uid("1.2", "x") == derived_uid("1.2.", "x")  # root without final dot
    default = derived_uid("", "x")
    assert default.startswith(PYDICOM_ROOT_UID) and default == derived_uid("", "x")
    with pytest.raises(ValueError, match="parts"):
        derived_uid("1.2.")


def test_instance_uids_follow_the_wrappers(source: Dataset) -> None:
    out = _derive(source)
    assert out.SeriesInstanceUID == derived_series_uid(
        source.SeriesInstanceUID, "w1", "soft", "1.2.3.4."
    )
    assert out.SOPInstanceUID == derived_sop_uid(source.SOPInstanceUID, "w1", "soft", "1.2.3.4.")
    assert out.SeriesInstanceUID != source.SeriesInstanceUID
    assert out.SOPInstanceUID != source.SOPInstanceUID
    again = _derive(source)  # reprocessing gives the same UIDs
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (
        out.SeriesInstanceUID,
        out.SOPInstanceUID,
    )


def test_instances_of_one_series_share_the_derived_series(tmp_path: Path) -> None:
    paths = make_ct_series(tmp_path, n=2, size=8)
    outs = [_derive(pydicom.dcmread(p)) for p in paths]
    assert outs[0].SeriesInstanceUID == outs[1].SeriesInstanceUID
    assert outs[0].SOPInstanceUID != outs[1].SOPInstanceUID


# -- Kept attributes ---------------------------------------------------------------------


KEPT = [
    "StudyInstanceUID",
    "FrameOfReferenceUID",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SliceLocation",
    "InstanceNumber",
    "AcquisitionNumber",
    "AcquisitionDate",
    "AcquisitionTime",
    "KVP",
    "ExposureTime",
    "XRayTubeCurrent",
    "ConvolutionKernel",
    "SeriesDate",
    "SeriesTime",
    "Modality",
    "Manufacturer",
    "RescaleIntercept",
    "RescaleSlope",
    "SOPClassUID",
    "ReferencedImageSequence",
]


@pytest.mark.parametrize("keyword", KEPT)
def test_attribute_is_kept(source: Dataset, keyword: str) -> None:
    out = _derive(source)
    if keyword == "ReferencedImageSequence":
        assert out[keyword][0].ReferencedSOPInstanceUID == "1.2.3"
    else:
        assert out[keyword].value == source[keyword].value


# -- Changed attributes ------------------------------------------------------------------


def test_image_type_derived_secondary_later_values_kept(source: Dataset) -> None:
    assert list(_derive(source).ImageType) == ["DERIVED", "SECONDARY", "AXIAL", "CT_SOM5 SPI"]


def test_series_number_plus_offset(source: Dataset) -> None:
    assert _derive(source).SeriesNumber == 1003
    del source.SeriesNumber
    assert _derive(source).SeriesNumber == 1000


def test_series_description_plus_suffix(source: Dataset) -> None:
    assert _derive(source).SeriesDescription == "Chest LD [LDCT denoised]"
    del source.SeriesDescription
    assert _derive(source).SeriesDescription == "[LDCT denoised]"
    source.SeriesDescription = "X" * 64
    long = _derive(source).SeriesDescription
    assert len(long) <= 64 and long.endswith(" [LDCT denoised]")


def test_derivation_description_names_algorithm_model_and_blend(source: Dataset) -> None:
    text = _derive(source, algorithm="DRL cascade X").DerivationDescription
    assert "DRL cascade X" in text
    assert "model w1" in text
    assert "blend 0.3" in text
    assert f"ldct-node {__version__}" in text


def test_derivation_code_is_cid_7203_smoothing(source: Dataset) -> None:
    (item,) = _derive(source).DerivationCodeSequence
    assert _code(item) == ("113087", "DCM", "Smoothing")


def test_source_image_sequence_references_source(source: Dataset) -> None:
    (item,) = _derive(source).SourceImageSequence
    assert item.ReferencedSOPClassUID == source.SOPClassUID
    assert item.ReferencedSOPInstanceUID == source.SOPInstanceUID
    (purpose,) = item.PurposeOfReferenceCodeSequence
    assert _code(purpose) == ("121322", "DCM", "Source image for image processing operation")


def test_related_series_sequence_references_source_series(source: Dataset) -> None:
    (item,) = _derive(source).RelatedSeriesSequence
    assert item.SeriesInstanceUID == source.SeriesInstanceUID
    assert item.StudyInstanceUID == source.StudyInstanceUID


def test_contributing_equipment_names_node_as_modifying_equipment(source: Dataset) -> None:
    earlier = Dataset()
    earlier.Manufacturer = "Other"
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = (
        "109102",
        "DCM",
        "Processing Equipment",
    )
    earlier.PurposeOfReferenceCodeSequence = [purpose]
    source.ContributingEquipmentSequence = [earlier]
    items = _derive(source).ContributingEquipmentSequence
    assert [i.Manufacturer for i in items] == ["Other", "ldct-node"]
    ours = items[-1]
    assert _code(ours.PurposeOfReferenceCodeSequence[0]) == (
        "109103",
        "DCM",
        "Modifying Equipment",
    )
    assert f"ldct-node {__version__}" in list(ours.SoftwareVersions)
    assert "model w1" in list(ours.SoftwareVersions)
    assert ours.ContributionDateTime == "20240506070809.123456"


def test_software_versions_name_node_and_model(source: Dataset) -> None:
    assert list(_derive(source).SoftwareVersions) == [f"ldct-node {__version__}", "model w1"]


def test_image_comments_from_config(source: Dataset) -> None:
    assert _derive(source).ImageComments == "Denoised; check before use"
    out = _derive(source, dicom=DicomSettings(image_comments=""))
    assert "ImageComments" not in out  # the scanner's comment does not describe our image


def test_non_ascii_comments_switch_default_charset_to_utf8(source: Dataset, tmp_path: Path) -> None:
    del source.SpecificCharacterSet
    comments = "Entrauscht für Befund — prüfen"
    out = _derive(source, dicom=DicomSettings(image_comments=comments))
    assert out.SpecificCharacterSet == "ISO_IR 192"
    back = pydicom.dcmread(write_derived(out, tmp_path))
    assert back.ImageComments == comments
    assert str(back.PatientName) == str(source.PatientName)


def test_fresh_creation_and_content_date_time(source: Dataset) -> None:
    out = _derive(source)
    assert (out.InstanceCreationDate, out.InstanceCreationTime) == ("20240506", "070809.123456")
    assert (out.ContentDate, out.ContentTime) == ("20240506", "070809.123456")


# -- Pixels ------------------------------------------------------------------------------


def test_pixels_encoded_with_source_rescale(source: Dataset) -> None:
    hu = decode_hu(source) * 0.5 + 3.3
    out = _derive(source, hu=hu)
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.file_meta.MediaStorageSOPClassUID == out.SOPClassUID
    assert (out.BitsAllocated, out.BitsStored, out.PixelRepresentation) == (16, 16, 1)
    assert out["PixelData"].VR == "OW"
    assert np.abs(decode_hu(out) - hu).max() <= 0.5


def test_pixels_clipped_to_stored_range(source: Dataset) -> None:
    source.BitsStored, source.HighBit = 12, 11  # signed 12-bit: HU -3072 .. 1023
    hu = np.full((16, 16), 0.0, dtype=np.float32)
    hu[0, 0], hu[0, 1] = -1e5, 1e5
    out = _derive(source, hu=hu)
    back = decode_hu(out)
    assert back[0, 0] == -2048 - 1024 and back[0, 1] == 2047 - 1024
    assert back[1, 1] == 0


def test_compressed_source_gives_uncompressed_output(tmp_path: Path) -> None:
    path = make_ct_series(tmp_path, n=1, size=16)[0]
    rle = pydicom.dcmread(compress(path, "rle-pydicom"))
    out = _derive(rle)
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert not out.file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_allclose(decode_hu(out), decode_hu(rle) - 10.0)


def test_pixel_padding_kept(source: Dataset) -> None:
    stored = source.pixel_array.copy()
    stored[:, :2] = -2000  # padding outside the field of view
    source.PixelData = stored.astype("<i2").tobytes()
    source.PixelPaddingValue = -2000
    pad_hu = -2000 - 1024.0
    hu = decode_hu(source) + 7.0
    hu[5, 5] = pad_hu  # a real pixel that happens to land on the padding value
    out = _derive(source, hu=hu)
    back = decode_hu(out)
    assert (back[:, :2] == pad_hu).all()
    assert back[5, 5] != pad_hu and abs(back[5, 5] - pad_hu) == 1
    assert out.PixelPaddingValue == -2000


def test_wrong_size_or_bad_source_rejected(source: Dataset) -> None:
    with pytest.raises(ValueError, match="shape"):
        _derive(source, hu=np.zeros((8, 8)))
    broken = copy.deepcopy(source)
    del broken.SOPInstanceUID
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        _derive(broken, hu=np.zeros((16, 16)))
    with pytest.raises(ValueError, match="model_version"):
        _derive(source, model_version="")


# -- Removed attributes and lossy history ------------------------------------------------


def test_private_tags_dropped_everywhere(source: Dataset) -> None:
    out = _derive(source)
    assert not any(elem.tag.is_private for elem in out)
    assert not any(elem.tag.is_private for elem in out.ReferencedImageSequence[0])


@pytest.mark.parametrize(
    "tag",
    [
        "IconImageSequence",
        "SmallestImagePixelValue",
        "LargestImagePixelValue",
        0x60000010,
        0x60003000,
    ],
)
def test_attributes_that_no_longer_apply_removed(source: Dataset, tag: str | int) -> None:
    assert tag in source
    assert tag not in _derive(source)


def test_lossy_history_kept(source: Dataset) -> None:
    source.LossyImageCompression = "01"
    source.LossyImageCompressionRatio = 8.5
    source.LossyImageCompressionMethod = "ISO_15444_1"
    out = _derive(source)
    assert out.LossyImageCompression == "01"
    assert float(out.LossyImageCompressionRatio) == 8.5
    assert out.LossyImageCompressionMethod == "ISO_15444_1"


def test_lossy_jpeg_source_marked_lossy(source: Dataset) -> None:
    hu = decode_hu(source)
    source.file_meta.TransferSyntaxUID = JPEGBaseline8Bit  # as received; pixels decoded before
    out = _derive(source, hu=hu)
    assert out.LossyImageCompression == "01"
    assert out.LossyImageCompressionMethod == "ISO_10918_1"


def test_source_dataset_not_modified(source: Dataset) -> None:
    before = copy.deepcopy(source)
    _derive(source)
    assert source == before
    assert source.file_meta == before.file_meta


def test_derived_output_is_never_reprocessed(source: Dataset) -> None:
    out = _derive(source)
    for ignore_derived in (True, False):
        reason = processing_skip_reason(out, SeriesSettings(ignore_derived=ignore_derived))
        assert reason is not None and "loop" in reason


# -- Writing and validation --------------------------------------------------------------


def test_write_derived_durable_named_by_uid(source: Dataset, tmp_path: Path) -> None:
    out = _derive(source)
    target = tmp_path / "derived"
    path = write_derived(out, target)
    assert path == target / f"{out.SOPInstanceUID}.dcm"
    assert [p.name for p in target.iterdir()] == [path.name]  # no temp files left
    back = pydicom.dcmread(path)
    assert back.SOPInstanceUID == out.SOPInstanceUID
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    np.testing.assert_array_equal(decode_hu(back), decode_hu(out))
    assert write_derived(out, target) == path  # rewriting is idempotent
    assert len(list(target.iterdir())) == 1
    bad = copy.deepcopy(out)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="SOPInstanceUID"):
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UID, as it should
        bad.SOPInstanceUID = "../escape"
        write_derived(bad, target)


@needs_dciodvfy
def test_derived_from_written_series_passes_dciodvfy(tmp_path: Path) -> None:
    source_path = make_ct_series(tmp_path, n=1, size=16)[0]
    assert dciodvfy_errors(source_path) == []
    out = _derive(pydicom.dcmread(source_path))
    assert dciodvfy_errors(write_derived(out, tmp_path / "d")) == []


@needs_dciodvfy
@pytest.mark.parametrize("name", ["CT_small.dcm", "693_J2KR.dcm"])
def test_derived_from_real_ct_adds_no_dciodvfy_errors(tmp_path: Path, name: str) -> None:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not installed")
    out = _derive(pydicom.dcmread(path))
    source_errors = set(dciodvfy_errors(Path(path)))
    new_errors = set(dciodvfy_errors(write_derived(out, tmp_path))) - source_errors
    assert new_errors == set()
