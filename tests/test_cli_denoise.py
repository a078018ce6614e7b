"""`ldct-node denoise` on real DICOM files: every transfer syntax, grouping, bad input."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from _dicom_util import compress, hu_of, make_ct_series, needs_dcmtk
from conftest import run_cli

from ldct_node.config import OutputProfile
from ldct_node.dicom.io import decode_hu
from ldct_node.malloc import huge_page_environment, huge_pages_in_use
from ldct_node.model.cascade import Cascade
from ldct_node.pipeline import profile_image


def _derived_files(out: Path) -> dict[str, list[Path]]:
    """Derived series folder name -> its files in InstanceNumber order."""

    def number(path: Path) -> int:
        return int(pydicom.dcmread(path, stop_before_pixels=True).InstanceNumber)

    return {
        d.name: sorted(d.glob("*.dcm"), key=number) for d in sorted(out.iterdir()) if d.is_dir()
    }


def test_denoise_two_series_in_one_folder(tmp_path: Path, untrained_weights: Path) -> None:
    src = tmp_path / "in"
    a = make_ct_series(src, n=3, size=48, seed=1, subdir="a", series_number=3)
    b = make_ct_series(src, n=2, size=40, seed=2, subdir="b", series_number=7)
    # Shuffled names must not change the slice order: sorting is by position.
    for i, path in enumerate(a):
        path.rename(path.with_name(f"z{9 - i}.dcm"))
    out = tmp_path / "out"
    res = run_cli("denoise", src, "--output", out, "--weights", untrained_weights)
    assert res.returncode == 0, res.stderr
    series = _derived_files(out)
    assert sorted(len(v) for v in series.values()) == [2, 3]
    # The command re-executed itself with huge pages where this machine has them.
    on = huge_pages_in_use() or huge_page_environment(os.environ) is not None
    state = "on" if on else "off"
    assert f"huge pages {state})" in " ".join(res.stderr.split()), res.stderr

    cascade = Cascade.load(untrained_weights)
    src_b = [pydicom.dcmread(p) for p in b]
    for files in series.values():
        derived = [pydicom.dcmread(p) for p in files]
        ref_series = {str(d.SourceImageSequence[0].ReferencedSOPInstanceUID) for d in derived}
        assert len({d.SeriesInstanceUID for d in derived}) == 1
        assert all(d.ImageType[0] == "DERIVED" and d.ImageType[1] == "SECONDARY" for d in derived)
        if len(files) == 2:
            assert ref_series == {str(s.SOPInstanceUID) for s in src_b}
            assert {int(d.SeriesNumber) for d in derived} == {1007}
            assert derived[0].SeriesDescription.endswith(" [LDCT denoised]")
            # Pixels are the cascade's output for the source pixels (stored-value rounding).
            by_src = {str(s.SOPInstanceUID): s for s in src_b}
            for d, path in zip(derived, files, strict=True):
                source = by_src[str(d.SourceImageSequence[0].ReferencedSOPInstanceUID)]
                # ... after the default profile's CT-number fidelity step.
                hu = decode_hu(source)
                expected = profile_image(source, hu, cascade.denoise(hu), OutputProfile())
                np.testing.assert_allclose(hu_of(path), expected, atol=0.51)
                assert d.InstanceNumber == source.InstanceNumber
                assert d.ImagePositionPatient == source.ImagePositionPatient


def test_same_input_gives_same_uids(tmp_path: Path, untrained_weights: Path) -> None:
    src = make_ct_series(tmp_path / "in", n=2, size=32)
    runs = []
    for name in ("o1", "o2"):
        assert (
            run_cli(
                "denoise", *src, "--output", tmp_path / name, "--weights", untrained_weights
            ).returncode
            == 0
        )
        runs.append({p.name for files in _derived_files(tmp_path / name).values() for p in files})
    assert runs[0] == runs[1] and len(runs[0]) == 2
    blended = tmp_path / "o3"
    assert (
        run_cli(
            "denoise", *src, "--output", blended, "--weights", untrained_weights, "--blend", "0.3"
        ).returncode
        == 0
    )
    derived = pydicom.dcmread(next(iter(_derived_files(blended).values()))[0])
    assert "blend 0.3" in derived.DerivationDescription


@pytest.fixture(scope="module")
def plain_denoised(
    tmp_path_factory: pytest.TempPathFactory, untrained_weights: Path
) -> tuple[list[Path], Path]:
    """An uncompressed series and its ``denoise`` output, once for every syntax below."""
    folder = tmp_path_factory.mktemp("plain")
    plain = make_ct_series(folder / "plain", n=2, size=40, seed=3)
    out_plain = folder / "op"
    assert (
        run_cli("denoise", *plain, "--output", out_plain, "--weights", untrained_weights).returncode
        == 0
    )
    return plain, out_plain


@needs_dcmtk
@pytest.mark.parametrize("syntax", ["jpeg-lossless-sv1", "jpeg-lossless", "j2k-lossless", "rle"])
def test_every_transfer_syntax(
    tmp_path: Path,
    untrained_weights: Path,
    syntax: str,
    plain_denoised: tuple[list[Path], Path],
) -> None:
    plain, out_plain = plain_denoised
    packed_dir = tmp_path / "packed"
    packed_dir.mkdir()
    packed = [compress(p, syntax, packed_dir / p.name) for p in plain]
    out_packed = tmp_path / "oc"
    res = run_cli("denoise", *packed, "--output", out_packed, "--weights", untrained_weights)
    assert res.returncode == 0, res.stderr
    a = [hu_of(p) for files in _derived_files(out_plain).values() for p in files]
    b = [hu_of(p) for files in _derived_files(out_packed).values() for p in files]
    # Lossless input decodes to the same pixels, so the derived output is identical.
    assert len(a) == len(b) == 2
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    ts = pydicom.dcmread(next(iter(_derived_files(out_packed).values()))[0]).file_meta
    assert ts.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian


def test_bad_input_is_reported_and_other_series_go_on(
    tmp_path: Path, untrained_weights: Path
) -> None:
    src = tmp_path / "in"
    make_ct_series(src, n=2, size=32, subdir="good")
    # A series whose pixel data is cut short: decoding fails for that series only.
    broken = make_ct_series(src, n=2, size=32, seed=5, subdir="broken")
    ds = pydicom.dcmread(broken[1])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(broken[1])
    # A non-CT instance (MR) and a file that is no DICOM at all.
    mr = make_ct_series(src, n=1, size=32, seed=6, subdir="mr")
    ds = pydicom.dcmread(mr[0])
    ds.Modality = "MR"
    ds.save_as(mr[0])
    (src / "notes.txt").write_text("not dicom")

    out = tmp_path / "out"
    res = run_cli("denoise", src, "--output", out, "--weights", untrained_weights)
    assert res.returncode == 1
    failed = [line for line in res.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2, res.stdout
    assert any("nothing to denoise" in line and "CT" in line for line in failed), failed
    assert "notes.txt" in res.stdout
    assert "2 of 3 series failed" in res.stderr
    assert [len(v) for v in _derived_files(out).values()] == [2]


def test_empty_or_missing_input(tmp_path: Path, untrained_weights: Path) -> None:
    (tmp_path / "empty").mkdir()
    res = run_cli(
        "denoise", tmp_path / "empty", "--output", tmp_path / "o", "--weights", untrained_weights
    )
    assert res.returncode == 1 and "no DICOM series found" in res.stderr
    assert "Traceback" not in res.stderr
    res = run_cli(
        "denoise", tmp_path / "nope", "--output", tmp_path / "o", "--weights", untrained_weights
    )
    assert res.returncode == 1 and "does not exist" in res.stderr
    res = run_cli("denoise", tmp_path / "empty", "--output", tmp_path / "o", "--weights", tmp_path)
    assert res.returncode == 1 and "MANIFEST.json" in res.stderr


def test_real_ct_hold_out_file(tmp_path: Path, untrained_weights: Path) -> None:
    """pydicom's CT_small (a real scan; evaluation-only data) goes through end to end."""
    from pydicom.data import get_testdata_file

    src = Path(str(get_testdata_file("CT_small.dcm")))
    shutil.copy(src, tmp_path / "ct.dcm")
    res = run_cli(
        "denoise", tmp_path / "ct.dcm", "--output", tmp_path / "o", "--weights", untrained_weights
    )
    assert res.returncode == 0, res.stderr
    (files,) = _derived_files(tmp_path / "o").values()
    d = pydicom.dcmread(files[0])
    s = pydicom.dcmread(src)
    assert d.StudyInstanceUID == s.StudyInstanceUID
    assert d.SeriesInstanceUID != s.SeriesInstanceUID
    assert d.PatientID == s.PatientID and (d.Rows, d.Columns) == (s.Rows, s.Columns)
