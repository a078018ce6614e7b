"""Low-dose CT simulator: projector accuracy, noise physics, phantoms, paired data sets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from _dicom_util import HAVE_DCIODVFY, dciodvfy_errors
from pydicom.uid import generate_uid
from scipy import ndimage

from ldct_node import __version__
from ldct_node.dicom.io import decode_hu, write_ct_series
from ldct_node.lab.simulation import (
    FILTERS,
    Phantom,
    ScanResult,
    SimulationParameters,
    default_i0,
    default_n_angles,
    fbp,
    low_dose_dir_name,
    make_phantom,
    n_detectors,
    project,
    simulate_dataset,
    simulate_scan,
)

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _disk(size: int, radius: float, centre: tuple[float, float] | None = None) -> np.ndarray:
    """Anti-aliased disk (value 1) by 8x8 supersampling of each pixel."""
    cy, cx = centre if centre is not None else ((size - 1) / 2, (size - 1) / 2)
    sub = (np.arange(8) + 0.5) / 8 - 0.5
    yy = (np.arange(size)[:, None] + sub[None, :]).ravel()
    inside = ((yy[:, None] - cy) ** 2 + (yy[None, :] - cx) ** 2) < radius**2
    return inside.reshape(size, 8, size, 8).mean(axis=(1, 3))


def _water(size: int, seed: int = 0) -> Phantom:
    return make_phantom(size, np.random.default_rng(seed), kind="water")


def _noise_ratio(result: ScanResult, region: np.ndarray) -> float:
    low = np.std((result.low_dose - result.truth_recon)[region])
    full = np.std((result.full_dose - result.truth_recon)[region])
    return float(low / full)


def _inner(mask: np.ndarray, pixels: int = 3) -> np.ndarray:
    return ndimage.binary_erosion(mask, iterations=pixels)


# --------------------------------------------------------------------------------------
# projector and FBP
# --------------------------------------------------------------------------------------


def test_projection_conserves_mass_and_matches_disk_chords() -> None:
    size, radius = 64, 20.0
    image = _disk(size, radius)
    sino = project(image, 32)
    assert sino.shape == (32, n_detectors(size))
    # Every view integrates the whole image.
    np.testing.assert_allclose(sino.sum(axis=1), image.sum(), rtol=1e-9)
    # Central chord of a centred disk: 2r in every direction.
    centre = (n_detectors(size) - 1) // 2
    np.testing.assert_allclose(sino[:, centre], 2 * radius, rtol=0.01)
    # A chord 10 pixels off centre: 2 sqrt(r^2 - 10^2).
    np.testing.assert_allclose(sino[:, centre + 10], 2 * math.sqrt(radius**2 - 100), rtol=0.02)


def test_projection_angle_convention() -> None:
    """Angle 0 integrates along columns, so a bright column makes one bright bin."""
    size = 32
    image = np.zeros((size, size))
    image[:, 20] = 1.0  # x = 20 - 15.5 = 4.5 pixels right of centre
    sino = project(image, 4)
    cm = (n_detectors(size) - 1) / 2
    assert np.argmax(sino[0]) in (math.floor(cm + 4.5), math.ceil(cm + 4.5))
    # at 90 degrees the column projects over its whole length, around the centre
    assert np.count_nonzero(sino[2] > 0.5) >= size - 2


def test_symmetric_fast_path_matches_direct_computation() -> None:
    rng = np.random.default_rng(3)
    image = ndimage.gaussian_filter(rng.standard_normal((48, 48)), 2.0)
    fast = project(image, 24, symmetric=True)
    slow = project(image, 24, symmetric=False)
    np.testing.assert_allclose(fast, slow, atol=1e-4 * np.abs(slow).max())
    rec_fast = fbp(fast, 48, symmetric=True)
    rec_slow = fbp(fast, 48, symmetric=False)
    np.testing.assert_allclose(rec_fast, rec_slow, atol=0.01 * np.abs(rec_slow).max())


@pytest.mark.parametrize("filter_name", FILTERS)
def test_fbp_reconstructs_a_disk(filter_name: str) -> None:
    size = 96
    image = _disk(size, 30.0, (50.0, 44.0))
    rec = fbp(project(image, 144), size, filter_name=filter_name)
    yy, xx = np.indices((size, size))
    r = np.hypot(yy - 50.0, xx - 44.0)
    assert abs(float(rec[r < 25].mean()) - 1.0) < 0.005
    assert abs(float(rec[r > 36].mean())) < 0.005
    assert float(np.abs(rec[r < 25] - 1.0).max()) < 0.06


def test_fbp_of_a_smooth_image_is_accurate_and_stacks() -> None:
    size = 64
    yy, xx = np.indices((size, size))
    blob = np.exp(-((yy - 30.0) ** 2 + (xx - 36.0) ** 2) / (2 * 8.0**2))
    sino = project(blob, 96)
    single = fbp(sino, size, filter_name="ramp")
    assert float(np.abs(single - blob).max()) < 0.01
    stacked = fbp(np.stack([sino, 2 * sino, -sino]), size, filter_name="ramp")
    assert stacked.shape == (3, size, size)
    np.testing.assert_allclose(stacked[1], 2 * single, atol=1e-5)
    np.testing.assert_allclose(stacked[2], -single, atol=1e-5)


def test_fbp_rejects_mismatched_sinograms() -> None:
    with pytest.raises(ValueError, match="sinogram"):
        fbp(np.zeros((10, 20)), 64)
    with pytest.raises(ValueError, match="filter_name"):
        fbp(np.zeros((10, n_detectors(64))), 64, filter_name="butterworth")
    with pytest.raises(ValueError, match="image"):
        project(np.zeros((10, 12)), 8)


# --------------------------------------------------------------------------------------
# scan simulation: the noise physics
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dose_fraction", [0.25, 0.5])
def test_noise_follows_inverse_square_root_of_dose(dose_fraction: float) -> None:
    """Without electronic noise, sigma_low / sigma_full = 1 / sqrt(dose fraction)."""
    ratios = []
    for seed in range(2):
        phantom = _water(128, seed)
        result = simulate_scan(
            phantom.image,
            phantom.pixel_spacing_mm,
            dose_fraction=dose_fraction,
            rng=np.random.default_rng(100 + seed),
            electronic_noise=0.0,
        )
        ratios.append(_noise_ratio(result, _inner(phantom.masks["water"])))
    expected = 1 / math.sqrt(dose_fraction)
    assert abs(np.mean(ratios) / expected - 1) < 0.1, ratios


def test_electronic_noise_breaks_the_dose_law_when_large() -> None:
    phantom = _water(128, 0)
    region = _inner(phantom.masks["water"])
    common = {"dose_fraction": 0.25, "i0": 2e4}
    quiet = simulate_scan(
        phantom.image,
        phantom.pixel_spacing_mm,
        rng=np.random.default_rng(1),
        electronic_noise=0.0,
        **common,
    )
    loud = simulate_scan(
        phantom.image,
        phantom.pixel_spacing_mm,
        rng=np.random.default_rng(1),
        electronic_noise=20.0,
        **common,
    )
    assert abs(_noise_ratio(quiet, region) - 2.0) < 0.2
    # The read-out noise weighs more where fewer photons arrive: low dose suffers most.
    assert _noise_ratio(loud, region) > 2.5
    assert np.std((loud.low_dose - loud.truth_recon)[region]) > 1.3 * np.std(
        (quiet.low_dose - quiet.truth_recon)[region]
    )


@pytest.mark.parametrize("geometry", ["parallel", "fan"])
def test_water_stays_unbiased_at_both_doses(geometry: str) -> None:
    phantom = _water(128, 1)
    result = simulate_scan(
        phantom.image,
        phantom.pixel_spacing_mm,
        dose_fraction=0.25,
        rng=np.random.default_rng(7),
        geometry=geometry,
    )
    region = _inner(phantom.masks["water"])
    for name in ("full_dose", "low_dose", "truth_recon"):
        image = getattr(result, name)
        assert image.dtype == np.float32 and image.shape == phantom.image.shape
        assert abs(float(image[region].mean())) < 2.0, name
    outside = _inner(phantom.masks["air"], 4)
    assert abs(float(result.truth_recon[outside].mean()) + 1000.0) < 2.0
    # The noiseless reconstruction differs from the truth only by blur at the edge
    # (wider for fan beam: its rays are interpolated twice).
    assert float(np.abs(result.truth_recon - phantom.image)[_inner(region, 4)].max()) < 5.0
    assert result.geometry == geometry and result.i0 == default_i0(128, geometry)
    assert result.n_angles == default_n_angles(128, geometry)


def test_fan_beam_noise_follows_the_dose_law() -> None:
    phantom = _water(128, 2)
    result = simulate_scan(
        phantom.image,
        phantom.pixel_spacing_mm,
        dose_fraction=0.25,
        rng=np.random.default_rng(5),
        electronic_noise=0.0,
        geometry="fan",
    )
    assert abs(_noise_ratio(result, _inner(phantom.masks["water"])) - 2.0) < 0.2


def test_body_noise_is_in_the_clinical_range() -> None:
    """Default counts: full-dose soft-tissue noise ~10-15 HU, quarter dose about twice."""
    phantom = make_phantom(128, np.random.default_rng(4))
    result = simulate_scan(
        phantom.image, phantom.pixel_spacing_mm, dose_fraction=0.25, rng=np.random.default_rng(0)
    )
    region = _inner(phantom.masks["soft_tissue"], 1)
    full = float(np.std((result.full_dose - result.truth_recon)[region]))
    low = float(np.std((result.low_dose - result.truth_recon)[region]))
    assert 7.0 < full < 20.0
    # a little above 1/sqrt(0.25): the electronic noise weighs on the low-count rays
    assert 1.8 < low / full < 2.6


def test_same_seed_same_scan_other_seed_other_noise() -> None:
    phantom = make_phantom(64, np.random.default_rng(0))
    kwargs = {"dose_fraction": 0.25}
    a = simulate_scan(
        phantom.image, phantom.pixel_spacing_mm, rng=np.random.default_rng(9), **kwargs
    )
    b = simulate_scan(
        phantom.image, phantom.pixel_spacing_mm, rng=np.random.default_rng(9), **kwargs
    )
    c = simulate_scan(
        phantom.image, phantom.pixel_spacing_mm, rng=np.random.default_rng(10), **kwargs
    )
    np.testing.assert_array_equal(a.low_dose, b.low_dose)
    np.testing.assert_array_equal(a.full_dose, b.full_dose)
    assert not np.array_equal(a.low_dose, c.low_dose)
    # the noiseless reconstruction does not depend on the noise
    np.testing.assert_array_equal(a.truth_recon, c.truth_recon)


def test_full_and_low_dose_noise_are_independent() -> None:
    phantom = _water(96, 3)
    result = simulate_scan(
        phantom.image, phantom.pixel_spacing_mm, dose_fraction=0.5, rng=np.random.default_rng(2)
    )
    region = _inner(phantom.masks["water"])
    full = (result.full_dose - result.truth_recon)[region]
    low = (result.low_dose - result.truth_recon)[region]
    assert abs(float(np.corrcoef(full, low)[0, 1])) < 0.1


def test_photon_starvation_is_reported() -> None:
    phantom = _water(64, 0)
    metal = phantom.image.copy()
    metal[28:36, 28:36] = 30000.0  # a dense insert no photon gets through
    result = simulate_scan(
        metal, phantom.pixel_spacing_mm, dose_fraction=0.25, rng=np.random.default_rng(0)
    )
    assert result.starved_fraction > 0
    assert np.isfinite(result.low_dose).all()


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"dose_fraction": 0.0}, "dose_fraction"),
        ({"dose_fraction": 1.5}, "dose_fraction"),
        ({"geometry": "cone"}, "geometry"),
        ({"filter_name": "sharp"}, "filter_name"),
        ({"i0": -1.0}, "i0"),
        ({"electronic_noise": -1.0}, "electronic_noise"),
        ({"n_angles": 2}, "n_angles"),
        ({"geometry": "fan", "n_angles": 101}, "n_angles"),
    ],
)
def test_scan_arguments_are_checked(kwargs: dict[str, object], argument: str) -> None:
    image = np.zeros((32, 32))
    call = {"dose_fraction": 0.25, "rng": np.random.default_rng(0), **kwargs}
    with pytest.raises(ValueError, match=argument):
        simulate_scan(image, 1.0, **call)  # type: ignore[arg-type]


def test_scan_needs_a_square_image_and_a_generator() -> None:
    with pytest.raises(ValueError, match="truth_hu"):
        simulate_scan(np.zeros((32, 40)), 1.0, dose_fraction=0.25, rng=np.random.default_rng())
    with pytest.raises(TypeError, match="rng"):
        simulate_scan(np.zeros((32, 32)), 1.0, dose_fraction=0.25, rng=0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# phantoms
# --------------------------------------------------------------------------------------


def test_body_phantom_has_the_promised_tissues() -> None:
    phantom = make_phantom(256, np.random.default_rng(1))
    image, masks = phantom.image, phantom.masks
    assert image.shape == (256, 256) and image.dtype == np.float32
    assert 340 <= phantom.pixel_spacing_mm * 256 <= 420
    assert float(np.median(image[masks["air"]])) == -1000.0
    fat = float(np.median(image[_inner(masks["fat"], 1)]))
    assert -120 <= fat <= -80
    assert 30 <= float(np.median(image[_inner(masks["muscle"], 1)])) <= 70
    assert 45 <= float(np.median(image[_inner(masks["liver"], 1)])) <= 110
    assert masks["kidney"].any() and masks["vessel"].any()
    assert float(image[masks["bone"]].max()) > 700  # cortical bone
    trabecular = image[_inner(masks["bone"], 2)]
    assert 100 <= float(np.median(trabecular)) <= 450
    # Organ texture: a few HU of correlated variation, not a flat fill.
    liver = image[_inner(masks["liver"], 3)]
    assert 2.0 < float(np.std(liver)) < 25.0


def test_body_phantom_vessels_carry_contrast_when_enhanced() -> None:
    for seed in range(20):
        phantom = make_phantom(128, np.random.default_rng(seed))
        if phantom.params["enhancement"] > 0:
            aorta = phantom.image[_inner(phantom.masks["vessel"], 1)]
            assert 110 <= float(np.median(aorta)) <= 260
            return
    pytest.fail("no contrast-enhanced case in 20 seeds")


def test_lungs_appear_at_upper_levels() -> None:
    phantom = make_phantom(128, np.random.default_rng(2), slice_z=160.0)
    lung = phantom.image[_inner(phantom.masks["lung"], 1)]
    assert lung.size > 50
    assert -900 <= float(np.median(lung)) <= -780


def test_lesions_have_the_promised_contrast_and_size() -> None:
    found = 0
    for seed in range(12):
        rng_seed = [seed, 0]
        with_ = make_phantom(256, np.random.default_rng(rng_seed))
        without = make_phantom(256, np.random.default_rng(rng_seed), with_lesions=False)
        assert without.lesions == () and not without.masks["lesion"].any()
        diff = with_.image - without.image
        # Only lesions change the image.
        assert np.all(diff[~with_.masks["lesion"]] == 0)
        for lesion in with_.lesions:
            assert 5 <= abs(lesion.contrast_hu) <= 20
            assert 3 <= lesion.diameter_mm <= 20
            assert lesion.radius_px * with_.pixel_spacing_mm <= lesion.diameter_mm / 2 + 1e-6
            yy, xx = np.indices(diff.shape)
            core = np.hypot(yy - lesion.row, xx - lesion.col) < lesion.radius_px - 1
            # lesions sit in their organ's tissue (a vessel crossing them stays a vessel)
            core &= with_.masks[lesion.organ]
            if core.any():
                np.testing.assert_allclose(diff[core], lesion.contrast_hu, atol=1e-3)
                found += 1
    assert found >= 3


def test_same_seed_same_patient_and_smooth_along_z() -> None:
    a = make_phantom(128, np.random.default_rng(5), slice_z=0.0)
    again = make_phantom(128, np.random.default_rng(5), slice_z=0.0)
    np.testing.assert_array_equal(a.image, again.image)
    other = make_phantom(128, np.random.default_rng(6), slice_z=0.0)
    assert not np.array_equal(a.image, other.image)
    near = make_phantom(128, np.random.default_rng(5), slice_z=1.0)
    far = make_phantom(128, np.random.default_rng(5), slice_z=60.0)
    assert near.pixel_spacing_mm == a.pixel_spacing_mm
    body = a.masks["body"]
    near_change = float(np.mean(np.abs(near.image - a.image)[body]))
    far_change = float(np.mean(np.abs(far.image - a.image)[body]))
    assert near_change < 0.5 * far_change
    # organs change size along z
    assert a.masks["liver"].sum() != far.masks["liver"].sum()


def test_water_phantom() -> None:
    phantom = make_phantom(64, np.random.default_rng(0), kind="water", fov_mm=300.0)
    assert phantom.pixel_spacing_mm == pytest.approx(300.0 / 64)
    assert np.all(phantom.image[phantom.masks["uniform"]] == 0.0)
    assert np.all(phantom.image[_inner(phantom.masks["air"], 1)] == -1000.0)
    assert phantom.masks["uniform"].sum() < phantom.masks["water"].sum()


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [({"kind": "head"}, "kind"), ({"fov_mm": 0.0}, "fov_mm"), ({"slice_z": math.nan}, "slice_z")],
)
def test_phantom_arguments_are_checked(kwargs: dict[str, object], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        make_phantom(64, np.random.default_rng(0), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        make_phantom(8, np.random.default_rng(0))


# --------------------------------------------------------------------------------------
# paired data sets on disk
# --------------------------------------------------------------------------------------


def _read_series(folder: Path) -> tuple[list[pydicom.Dataset], np.ndarray]:
    datasets = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    return datasets, np.stack([decode_hu(ds) for ds in datasets])


def test_dataset_layout_tags_and_pixels(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    cases = simulate_dataset(
        out,
        SimulationParameters(
            n_cases=2, slices_per_case=2, size=64, seed=11, write_truth_recon=True
        ),
        progress=False,
    )
    assert cases == [out / "sim0001", out / "sim0002"]
    manifest = json.loads((out / "simulation.json").read_text())
    assert manifest["complete"] is True
    assert manifest["seed"] == 11 and manifest["size"] == 64
    assert manifest["dose_fraction"] == 0.25 and manifest["geometry"] == "parallel"
    assert manifest["ldct_node_version"] == __version__
    assert manifest["n_cases"] == 2 and manifest["n_slices"] == 4
    for key in ("electronic_noise", "n_angles", "i0", "filter_name"):
        assert key in manifest
    studies = set()
    for number, case in enumerate(cases, start=1):
        folders = sorted(p.name for p in case.iterdir())
        assert folders == ["full_dose", "quarter_dose", "truth", "truth_recon"]
        series = {name: _read_series(case / name) for name in folders}
        uids = {name: ds[0].SeriesInstanceUID for name, (ds, _) in series.items()}
        assert len(set(uids.values())) == 4
        for datasets, volume in series.values():
            assert volume.shape == (2, 64, 64)
            assert {ds.StudyInstanceUID for ds in datasets} == {datasets[0].StudyInstanceUID}
            assert str(datasets[0].PatientName) == f"SIM^{number:04d}"
            z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
            assert z[1] - z[0] == pytest.approx(3.0)
            assert [int(ds.InstanceNumber) for ds in datasets] == [1, 2]
        first = [ds for ds, _ in series.values()]
        assert len({ds[0].StudyInstanceUID for ds in first}) == 1
        assert len({ds[0].FrameOfReferenceUID for ds in first}) == 1
        studies.add(first[0][0].StudyInstanceUID)

        # The truth series is the phantom the case was drawn from (rounded to 1 HU).
        truth = series["truth"][1]
        pixel = float(series["truth"][0][0].PixelSpacing[0])
        for i, z_mm in enumerate((-1.5, 1.5)):
            phantom = make_phantom(64, np.random.default_rng([11, number - 1]), slice_z=z_mm)
            assert pixel == pytest.approx(phantom.pixel_spacing_mm)
            assert float(np.abs(truth[i] - phantom.image).max()) <= 0.5 + 1e-3
        # Low dose is about twice as noisy as full dose around the noiseless recon.
        recon = series["truth_recon"][1]
        body = recon > -500
        full_noise = np.std((series["full_dose"][1] - recon)[body])
        low_noise = np.std((series["quarter_dose"][1] - recon)[body])
        assert 1.5 < low_noise / full_noise < 2.6
        if HAVE_DCIODVFY:
            for name in folders:
                assert dciodvfy_errors(case / name / "CT0001.dcm") == [], name
        record = manifest["cases"][number - 1]
        assert record["case_id"] == case.name and record["n_slices"] == 2
        assert record["files"] == {"full_dose": 2, "quarter_dose": 2, "truth": 2, "truth_recon": 2}
    assert len(studies) == 2


def test_dataset_is_reproducible_and_checks_its_folder(tmp_path: Path) -> None:
    args = {"n_cases": 1, "slices_per_case": 2, "size": 32, "seed": 3}
    simulate_dataset(
        tmp_path / "a", SimulationParameters(dose_fraction=0.1, **args), progress=False
    )
    simulate_dataset(
        tmp_path / "b", SimulationParameters(dose_fraction=0.1, **args), progress=False
    )
    for folder in ("full_dose", "low_dose_10", "truth"):
        da, va = _read_series(tmp_path / "a" / "sim0001" / folder)
        db, vb = _read_series(tmp_path / "b" / "sim0001" / folder)
        np.testing.assert_array_equal(va, vb)
        assert [d.SOPInstanceUID for d in da] == [d.SOPInstanceUID for d in db]
    with pytest.raises(ValueError, match="output_dir"):
        simulate_dataset(tmp_path / "a", SimulationParameters(**args), progress=False)
    with pytest.raises(ValueError, match="n_cases"):
        simulate_dataset(tmp_path / "c", SimulationParameters(**{**args, "n_cases": 0}))
    with pytest.raises(ValueError, match="geometry"):
        simulate_dataset(tmp_path / "c", SimulationParameters(geometry="helical", **args))


def test_low_dose_folder_names() -> None:
    assert low_dose_dir_name(0.25) == "quarter_dose"
    assert low_dose_dir_name(0.1) == "low_dose_10"
    assert low_dose_dir_name(0.5) == "low_dose_50"
    with pytest.raises(ValueError, match="dose_fraction"):
        low_dose_dir_name(0.0)


def test_dataset_from_source_series_keeps_their_geometry(tmp_path: Path) -> None:
    """A site's normal-dose series (here a written phantom, 48 x 64) is the truth."""
    volume = np.stack(
        [
            make_phantom(64, np.random.default_rng(8), slice_z=z).image[8:56, :]
            for z in (0.0, 2.5, 5.0)
        ]
    )
    source = tmp_path / "ndct"
    write_ct_series(
        volume,
        source,
        pixel_spacing_mm=5.5,
        slice_thickness_mm=2.5,
        series_description="normal dose",
        series_number=2,
        study_uid=generate_uid(),
        frame_of_reference_uid=generate_uid(),
        patient_name="REAL^PATIENT",
        patient_id="123456",
        start_z_mm=-40.0,
    )
    out = tmp_path / "pairs"
    parameters = SimulationParameters(n_cases=5, slices_per_case=2, seed=1, source_series=(source,))
    cases = simulate_dataset(out, parameters, progress=False)
    assert len(cases) == 1
    truth_ds, truth = _read_series(cases[0] / "truth")
    _, full = _read_series(cases[0] / "full_dose")
    assert truth.shape == full.shape == (2, 48, 64)
    # the middle two slices, HU unchanged (air below -1024 clipped), geometry kept
    np.testing.assert_allclose(truth, np.rint(volume[0:2]), atol=0.5)
    assert float(truth_ds[0].PixelSpacing[0]) == pytest.approx(5.5)
    assert [float(d.ImagePositionPatient[2]) for d in truth_ds] == pytest.approx([-40.0, -37.5])
    # no patient data is carried over
    assert str(truth_ds[0].PatientName) == "SIM^0001" and truth_ds[0].PatientID != "123456"
    assert abs(float(np.mean(full - truth))) < 10.0
    manifest = json.loads((out / "simulation.json").read_text())
    assert manifest["source_series"] == [str(source)]
    assert manifest["cases"][0]["rows"] == 48 and manifest["cases"][0]["columns"] == 64


def test_dataset_with_worker_processes_matches_in_process(tmp_path: Path) -> None:
    parameters = SimulationParameters(n_cases=1, slices_per_case=2, size=32, seed=4)
    simulate_dataset(tmp_path / "one", parameters, workers=1, progress=False)
    simulate_dataset(tmp_path / "two", parameters, workers=2, progress=False)
    _, one = _read_series(tmp_path / "one" / "sim0001" / "quarter_dose")
    _, two = _read_series(tmp_path / "two" / "sim0001" / "quarter_dose")
    np.testing.assert_array_equal(one, two)


def _write_source(folder: Path, n: int = 10, size: int = 40, spacing: float = 1.0) -> np.ndarray:
    volume = np.stack(
        [make_phantom(size, np.random.default_rng(3), slice_z=2.0 * k).image for k in range(n)]
    )
    write_ct_series(
        volume,
        folder,
        pixel_spacing_mm=spacing,
        slice_thickness_mm=2.0,
        series_description="normal dose",
        series_number=2,
        study_uid=generate_uid(),
        frame_of_reference_uid=generate_uid(),
        patient_name="REAL^PATIENT",
        patient_id="123456",
        start_z_mm=0.0,
    )
    return volume


def test_source_slice_range_step_and_positions(tmp_path: Path) -> None:
    """A block of a source series (training vs held-out) with its positions recorded."""
    volume = _write_source(tmp_path / "ndct")
    out = tmp_path / "pairs"
    simulate_dataset(
        out,
        SimulationParameters(
            n_cases=1, seed=1, source_series=(tmp_path / "ndct",), slice_range=(3, 9), slice_step=3
        ),
        progress=False,
    )
    truth_ds, truth = _read_series(out / "sim0001" / "truth")
    # slices 3, 6, 9 (1-based) of the series: the whole range, every third slice
    np.testing.assert_allclose(truth, np.rint(np.maximum(volume[[2, 5, 8]], -1024)), atol=0.5)
    assert [float(d.ImagePositionPatient[2]) for d in truth_ds] == pytest.approx([4.0, 10.0, 16.0])
    case = json.loads((out / "simulation.json").read_text())["cases"][0]
    assert case["source_slices"] == [
        {"index": 3, "position_mm": 4.0},
        {"index": 6, "position_mm": 10.0},
        {"index": 9, "position_mm": 16.0},
    ]
    # --slices caps a range from its middle
    simulate_dataset(
        tmp_path / "capped",
        SimulationParameters(
            n_cases=1, slices_per_case=2, source_series=(tmp_path / "ndct",), slice_range=(1, 10)
        ),
        progress=False,
    )
    capped = json.loads((tmp_path / "capped" / "simulation.json").read_text())["cases"][0]
    assert [s["index"] for s in capped["source_slices"]] == [5, 6]
    with pytest.raises(ValueError, match="slice_range: 5:11 is past the 10 slices"):
        simulate_dataset(
            tmp_path / "past",
            SimulationParameters(
                n_cases=1, source_series=(tmp_path / "ndct",), slice_range=(5, 11)
            ),
        )
    with pytest.raises(ValueError, match="slice_range"):
        simulate_dataset(
            tmp_path / "bad",
            SimulationParameters(n_cases=1, source_series=(tmp_path / "ndct",), slice_range=(4, 2)),
        )
    with pytest.raises(ValueError, match="only for source_series"):
        simulate_dataset(tmp_path / "phantom", SimulationParameters(n_cases=1, slice_range=(1, 2)))


def test_source_resampled_to_a_pixel_size_keeps_the_anatomy_in_mm(tmp_path: Path) -> None:
    """--pixel-size 0.5 on a 1 mm source doubles the pixels an object spans; the canvas
    is --size, air around the anatomy."""
    volume = _write_source(tmp_path / "ndct", n=2, size=40, spacing=1.0)
    out = tmp_path / "pairs"
    simulate_dataset(
        out,
        SimulationParameters(
            n_cases=1, size=96, pixel_size_mm=0.5, source_series=(tmp_path / "ndct",)
        ),
        progress=False,
    )
    truth_ds, truth = _read_series(out / "sim0001" / "truth")
    assert truth.shape == (2, 96, 96)
    assert float(truth_ds[0].PixelSpacing[0]) == pytest.approx(0.5)
    # The body's area in mm^2 is kept (within resampling at its edge) ...
    area_source = float(np.sum(volume[0] > -500)) * 1.0
    area_out = float(np.sum(truth[0] > -500)) * 0.25
    assert area_out == pytest.approx(area_source, rel=0.08)
    # ... centred, with air around it.
    assert np.all(truth[0][:4] <= -999) and np.all(truth[0][:, -4:] <= -999)
    assert np.mean(truth[0][8:88, 8:88]) > np.mean(volume[0]) - 50
    # A pixel size that does not fit the canvas is cropped centrally.
    simulate_dataset(
        tmp_path / "crop",
        SimulationParameters(
            n_cases=1, size=32, pixel_size_mm=0.5, source_series=(tmp_path / "ndct",)
        ),
        progress=False,
    )
    _, cropped = _read_series(tmp_path / "crop" / "sim0001" / "truth")
    assert cropped.shape == (2, 32, 32)
    with pytest.raises(ValueError, match="pixel_size_mm"):
        simulate_dataset(
            tmp_path / "zero",
            SimulationParameters(n_cases=1, pixel_size_mm=0.0, source_series=(tmp_path / "ndct",)),
        )
