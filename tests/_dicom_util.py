"""Shared helpers for tests that need small CT series on disk.

``make_ct_volume`` builds a tiny phantom in HU, ``make_ct_series`` writes it with
:func:`ldct_node.dicom.io.write_ct_series`, ``compress`` re-encodes one file in another
transfer syntax (DCMTK or pydicom), and ``dciodvfy_errors`` runs the IOD validator.
Tools that may be missing come with ``needs_*`` pytest skip marks.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from ldct_node.dicom.io import write_ct_series

HAVE_DCMTK = all(shutil.which(t) for t in ("dcmcjpeg", "dcmcrle", "dcmdjpeg"))
HAVE_DCIODVFY = shutil.which("dciodvfy") is not None
needs_dcmtk = pytest.mark.skipif(not HAVE_DCMTK, reason="DCMTK (dcmcjpeg, dcmcrle) not installed")
needs_dciodvfy = pytest.mark.skipif(not HAVE_DCIODVFY, reason="dciodvfy (dicom3tools) missing")

#: Transfer syntaxes :func:`compress` can make, with the UID each one gives.
SYNTAXES = {
    "jpeg-lossless-sv1": "1.2.840.10008.1.2.4.70",  # DCMTK dcmcjpeg +e1
    "jpeg-lossless": "1.2.840.10008.1.2.4.57",  # DCMTK dcmcjpeg +el (process 14, SV 6)
    "rle": "1.2.840.10008.1.2.5",  # DCMTK dcmcrle
    "rle-pydicom": "1.2.840.10008.1.2.5",  # pydicom's own RLE encoder
    "j2k-lossless": "1.2.840.10008.1.2.4.90",  # pydicom + pylibjpeg-openjpeg
    "implicit": "1.2.840.10008.1.2",  # implicit VR little endian
}


def make_ct_volume(
    n: int = 4, size: int = 64, *, seed: int = 0, noise_hu: float = 20.0
) -> np.ndarray:
    """An (n, size, size) float32 HU phantom: air, a water disc, a bone insert, noise.

    Each slice differs (the bone insert moves) so slice order is visible in the pixels.
    """
    if n < 1 or size < 8:
        raise ValueError("n must be >= 1 and size >= 8")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2.0
    body = (yy - c) ** 2 + (xx - c) ** 2 <= (0.42 * size) ** 2
    volume = np.full((n, size, size), -1000.0, dtype=np.float32)
    for i in range(n):
        sl = volume[i]
        sl[body] = 40.0
        bx = c + (i - (n - 1) / 2.0) * size / (4.0 * max(n, 1))
        bone = (yy - c) ** 2 + (xx - bx) ** 2 <= (0.08 * size) ** 2
        sl[bone] = 700.0
    volume += rng.normal(0.0, noise_hu, volume.shape).astype(np.float32)
    return volume


def make_ct_series(
    tmp_path: Path,
    n: int = 4,
    size: int = 64,
    *,
    seed: int = 0,
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 2,
    series_description: str = "LDCT test",
    pixel_spacing_mm: float = 0.8,
    slice_thickness_mm: float = 2.5,
    start_z_mm: float = 0.0,
    subdir: str = "series",
    extra: dict[str, object] | None = None,
    volume_hu: np.ndarray | None = None,
) -> list[Path]:
    """Write a small CT series under ``tmp_path / subdir`` and return its files in order.

    ``volume_hu`` overrides the phantom from :func:`make_ct_volume`.
    """
    volume = make_ct_volume(n, size, seed=seed) if volume_hu is None else volume_hu
    return write_ct_series(
        volume,
        Path(tmp_path) / subdir,
        pixel_spacing_mm=pixel_spacing_mm,
        slice_thickness_mm=slice_thickness_mm,
        series_description=series_description,
        series_number=series_number,
        study_uid=study_uid or generate_uid(),
        frame_of_reference_uid=frame_of_reference_uid or generate_uid(),
        patient_name="Test^Patient",
        patient_id="TEST0001",
        series_uid=series_uid,
        start_z_mm=start_z_mm,
        extra=extra,
    )


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({result.returncode}): {result.stderr.strip()}")


def compress(path: Path, syntax: str, out: Path | None = None) -> Path:
    """Re-encode one DICOM file in ``syntax`` (a key of :data:`SYNTAXES`).

    Returns the new file (default: next to the input, named ``<stem>.<syntax>.dcm``).
    The SOPInstanceUID is kept.
    """
    if syntax not in SYNTAXES:
        raise ValueError(f"syntax: expected one of {sorted(SYNTAXES)}, got {syntax!r}")
    path = Path(path)
    out = Path(out) if out is not None else path.with_name(f"{path.stem}.{syntax}.dcm")
    if syntax == "jpeg-lossless-sv1":
        _run(["dcmcjpeg", "+e1", "+un", str(path), str(out)])
    elif syntax == "jpeg-lossless":
        _run(["dcmcjpeg", "+el", "+un", str(path), str(out)])
    elif syntax == "rle":
        _run(["dcmcrle", "+un", str(path), str(out)])
    else:
        ds = pydicom.dcmread(path)
        if syntax == "rle-pydicom":
            ds.compress(pydicom.uid.RLELossless)
        elif syntax == "j2k-lossless":
            ds.compress(pydicom.uid.JPEG2000Lossless)
        else:  # implicit VR little endian
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        ds.save_as(out, enforce_file_format=True)
    written = pydicom.dcmread(out, stop_before_pixels=True)
    if written.file_meta.TransferSyntaxUID != SYNTAXES[syntax]:
        raise RuntimeError(f"{out}: got {written.file_meta.TransferSyntaxUID}, wanted {syntax}")
    return out


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy prints for one file (empty when it finds none)."""
    result = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (result.stdout + result.stderr).splitlines()
    return [line.strip() for line in lines if line.strip().startswith("Error")]


def hu_of(path: Path) -> np.ndarray:
    """Decoded HU of one file (full read, via :func:`ldct_node.dicom.io.decode_hu`)."""
    from ldct_node.dicom.io import decode_hu

    return decode_hu(pydicom.dcmread(path))


def corrupt_pixel_data_vr(path: Path, vr: bytes = b"O\xff") -> Path:
    """Overwrite the VR of ``path``'s PixelData element (explicit VR) with ``vr``, as a
    flipped byte on the way would: the header before it stays readable."""
    data = bytearray(path.read_bytes())
    at = data.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010), little endian
    if at < 0 or data[at + 4 : at + 6] not in (b"OB", b"OW"):
        raise ValueError(f"{path}: no explicit-VR PixelData element")
    data[at + 4 : at + 6] = vr
    path.write_bytes(bytes(data))
    return path
