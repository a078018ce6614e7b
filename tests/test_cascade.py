"""Inference cascade: HU <-> model range, shapes, blending, precision, manifest checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLED_WEIGHTS

from ldct_node.model.cascade import Cascade, blend_with_input
from ldct_node.model.manifest import WeightsError
from ldct_node.model.scaling import HU_MIN, HU_RANGE, hu_to_model, model_to_hu


def test_hu_model_range_round_trip() -> None:
    hu = np.array([-1024.0, -1000.0, 0.0, 40.0, 1000.0, 3071.0], np.float32)
    m = hu_to_model(hu)
    assert m.min() >= 0.0 and m.max() <= 1.0
    np.testing.assert_allclose(model_to_hu(m), hu, atol=1e-3)
    assert hu_to_model(np.array([-3000.0, 9000.0])).tolist() == [0.0, 1.0]


@pytest.fixture(scope="module")
def cascade(untrained_weights: Path) -> Cascade:
    return Cascade.load(untrained_weights, batch_size=3)


@pytest.mark.parametrize("shape", [(5, 64, 64), (2, 128, 128), (3, 40, 72), (1, 512, 512)])
def test_output_shape_dtype_and_range(cascade: Cascade, shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(1)
    hu = rng.normal(40, 30, shape).astype(np.float32)
    hu[:, :4, :] = -1000.0
    out = cascade.denoise(hu)
    assert out.shape == shape and out.dtype == np.float32
    assert np.isfinite(out).all()
    # The model range bounds what the networks can return, up to float rounding.
    assert out.min() >= HU_MIN - 1 and out.max() <= HU_MIN + HU_RANGE + 1


def test_single_slice_and_batches_agree(cascade: Cascade) -> None:
    hu = np.random.default_rng(2).normal(0, 20, (4, 48, 48)).astype(np.float32)
    stacked = cascade.denoise(hu)
    one = cascade.denoise(hu[2])
    assert one.shape == (48, 48)
    np.testing.assert_allclose(one, stacked[2], atol=0.05)


def test_out_of_range_pixels_keep_their_values_and_blend(cascade: Cascade) -> None:
    hu = np.full((1, 32, 32), 50.0, np.float32)
    hu[0, 0, :] = -2000.0  # padding outside the field of view
    hu[0, 1, :] = 8000.0  # metal beyond the model range
    out = cascade.denoise(hu)
    assert (out[0, 0] == -2000.0).all() and (out[0, 1] == 8000.0).all()
    np.testing.assert_allclose(cascade.denoise(hu, blend=1.0), hu, atol=1e-3)
    half = cascade.denoise(hu, blend=0.5)
    np.testing.assert_allclose(half, blend_with_input(out, hu, 0.5), atol=0.05)
    with pytest.raises(ValueError, match="blend"):
        cascade.denoise(hu, blend=1.5)


def test_bad_shapes_are_refused(cascade: Cascade) -> None:
    with pytest.raises(ValueError, match="slices_hu"):
        cascade.denoise(np.zeros((2, 2, 8, 8)))


def test_bfloat16_close_to_float32(untrained_weights: Path) -> None:
    hu = np.random.default_rng(3).normal(40, 25, (2, 64, 64)).astype(np.float32)
    ref = Cascade.load(untrained_weights).denoise(hu)
    low = Cascade.load(untrained_weights, precision="bfloat16").denoise(hu)
    # bf16 has an 8-bit mantissa; the untrained nets still track float32 to a few HU.
    assert float(np.sqrt(np.mean((low - ref) ** 2))) < 20.0
    with pytest.raises(ValueError, match="precision"):
        Cascade.load(untrained_weights, precision="int8")


def test_manifest_errors(untrained_weights: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"MANIFEST\.json"):
        Cascade.load(tmp_path)
    broken = tmp_path / "w"
    shutil.copytree(untrained_weights, broken)
    with (broken / "drl_difference.weights.h5").open("r+b") as fh:
        fh.seek(4000)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(WeightsError, match="sha256"):
        Cascade.load(broken)
    (broken / "drl_difference.weights.h5").unlink()
    with pytest.raises(WeightsError, match="missing"):
        Cascade.load(broken)
    manifest = json.loads((untrained_weights / "MANIFEST.json").read_text())
    manifest["format"] = 99
    (broken / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match="format"):
        Cascade.load(broken)


@pytest.mark.skipif(not (BUNDLED_WEIGHTS / "MANIFEST.json").exists(), reason="no bundled weights")
@pytest.mark.parametrize("kind", ["water", "body"])
def test_bundled_weights_lower_noise_on_held_out_simulated_slices(kind: str) -> None:
    """Quarter-dose slices the training never saw (another seed): noise and error drop."""
    from ldct_node.lab.simulation import make_phantom, simulate_scan

    rng = np.random.default_rng(424242)
    phantom = make_phantom(256, rng, kind=kind)
    scan = simulate_scan(phantom.image, phantom.pixel_spacing_mm, dose_fraction=0.25, rng=rng)
    region = phantom.masks["uniform" if kind == "water" else "soft_tissue"]
    out = Cascade.load(BUNDLED_WEIGHTS).denoise(scan.low_dose)

    noise_in = float(np.std((scan.low_dose - scan.truth_recon)[region]))
    noise_out = float(np.std((out - scan.truth_recon)[region]))
    rmse_in = float(np.sqrt(np.mean((scan.low_dose - scan.full_dose)[region] ** 2)))
    rmse_out = float(np.sqrt(np.mean((out - scan.full_dose)[region] ** 2)))
    # The bundled weights remove about 64 % of the quarter-dose noise on the held-out
    # set of the README; 40 % is a floor with room for other phantoms.
    assert noise_out < 0.6 * noise_in, (noise_in, noise_out)
    assert rmse_out < rmse_in, (rmse_in, rmse_out)
    if kind == "water":  # denoising must not shift the CT number of water
        assert abs(float(np.mean(out[region]))) < 5.0


@pytest.mark.skipif(not (BUNDLED_WEIGHTS / "MANIFEST.json").exists(), reason="no bundled weights")
def test_bundled_weights_carry_only_the_networks() -> None:
    import h5py

    for file in BUNDLED_WEIGHTS.glob("*.weights.h5"):
        with h5py.File(file) as h5:
            assert sorted(h5.keys()) == ["layers", "vars"], file
        assert file.stat().st_size < 2_000_000, file  # ~225k float32 parameters
