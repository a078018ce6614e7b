"""Enhanced CT (multi-frame) input: per-frame decoding, frame-by-frame denoising, and a
derived Enhanced CT that ``dciodvfy`` accepts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from _dicom_util import corrupt_pixel_data_vr, dciodvfy_errors, make_ct_volume, needs_dciodvfy
from _enhanced_util import write_enhanced_ct

from ldct_node.config import ENHANCED_CT_IMAGE_STORAGE, DicomSettings, OutputProfile
from ldct_node.dicom.derive import derived_series_uid
from ldct_node.dicom.enhanced import decode_frames_hu, encode_frames_like, frame_rescales
from ldct_node.dicom.io import InputError, is_own_output
from ldct_node.model.cascade import Cascade
from ldct_node.pipeline import denoise_series, profile_image


@pytest.fixture
def enhanced(tmp_path: Path) -> tuple[Path, np.ndarray]:
    volume = make_ct_volume(3, 32, seed=4)
    return write_enhanced_ct(volume, tmp_path / "src" / "enhanced.dcm"), volume


@needs_dciodvfy
def test_test_input_is_a_valid_enhanced_ct(enhanced: tuple[Path, np.ndarray]) -> None:
    assert dciodvfy_errors(enhanced[0]) == []


def test_frames_decode_with_their_own_rescale(enhanced: tuple[Path, np.ndarray]) -> None:
    path, volume = enhanced
    ds = pydicom.dcmread(path)
    np.testing.assert_allclose(decode_frames_hu(ds), volume, atol=0.5)
    # Frame 2 gets another rescale: its HU must follow, the others must not.
    item = ds.PerFrameFunctionalGroupsSequence[1].PixelValueTransformationSequence[0]
    item.RescaleIntercept = -1000
    item.RescaleSlope = 2
    hu = decode_frames_hu(ds)
    stored = ds.pixel_array.astype(np.float64)
    np.testing.assert_allclose(hu[1], stored[1] * 2 - 1000)
    np.testing.assert_allclose(hu[0], stored[0] - 1024)
    # encode_frames_like is the inverse, frame by frame.
    np.testing.assert_array_equal(encode_frames_like(hu, ds), ds.pixel_array)
    assert frame_rescales(ds).tolist() == [[1, -1024], [2, -1000], [1, -1024]]


def test_broken_multiframe_input_is_an_input_error(enhanced: tuple[Path, np.ndarray]) -> None:
    ds = pydicom.dcmread(enhanced[0])
    ds.NumberOfFrames = 4  # the pixel data holds 3
    with pytest.raises(InputError, match="4 frames"):
        decode_frames_hu(ds)
    ds.NumberOfFrames = 3
    ds.PerFrameFunctionalGroupsSequence[0].PixelValueTransformationSequence[0].RescaleSlope = 0
    with pytest.raises(InputError, match="frame 1: unusable rescale"):
        decode_frames_hu(ds)
    # A corrupt VR on the pixel data element (the header before it reads fine).
    broken = pydicom.dcmread(corrupt_pixel_data_vr(enhanced[0]))
    with pytest.raises(InputError, match=r"pixel data element cannot be read .*Value Repr"):
        decode_frames_hu(broken)


@needs_dciodvfy
def test_denoised_enhanced_ct_is_a_valid_derived_enhanced_ct(
    enhanced: tuple[Path, np.ndarray], tmp_path: Path, untrained_weights: Path
) -> None:
    path, _ = enhanced
    source = pydicom.dcmread(path)
    cascade = Cascade.load(untrained_weights, batch_size=2, device="cpu")
    profiles = [OutputProfile(name="a"), OutputProfile(name="b", blend=0.5)]
    written = denoise_series([source], cascade, profiles, DicomSettings(), tmp_path / "out")
    assert [w.profile for w in written] == ["a", "b"]
    source_hu = decode_frames_hu(source)
    # frame by frame, as a stack of slices, then each profile's fidelity step and blend
    denoised = cascade.denoise(source_hu)
    for series in written:
        assert series.series_uid == derived_series_uid(
            str(source.SeriesInstanceUID), cascade.model_version, series.profile, ""
        )
        assert len(series.paths) == 1
        assert dciodvfy_errors(series.paths[0]) == []
        ds = pydicom.dcmread(series.paths[0])
        assert ds.SOPClassUID == ENHANCED_CT_IMAGE_STORAGE
        assert ds.SOPInstanceUID != source.SOPInstanceUID
        assert int(ds.NumberOfFrames) == 3
        assert list(ds.ImageType) == ["DERIVED", "PRIMARY", "VOLUME", "FILTERED"]
        assert is_own_output(ds)  # the loop guard recognises it
        evidence = ds.SourceImageEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        profile = profiles[0] if series.profile == "a" else profiles[1]
        expected = profile_image(source, source_hu, denoised, profile)
        np.testing.assert_allclose(decode_frames_hu(ds), expected, atol=1.0)
