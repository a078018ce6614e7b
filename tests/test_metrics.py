"""Held-out metrics: RMSE and noise against a known truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _dicom_util import make_ct_series

from ldct_node.model.cascade import Cascade
from ldct_node.model.metrics import evaluate_cases, noise_std, rmse


def test_rmse_and_noise_std() -> None:
    a = np.zeros((4, 4))
    b = np.full((4, 4), 3.0)
    assert rmse(a, b) == pytest.approx(3.0)
    mask = np.zeros((4, 4), bool)
    mask[0, :2] = True
    b[0, 0] = 5.0
    assert rmse(a, b, mask) == pytest.approx(np.sqrt((25 + 9) / 2))
    assert noise_std(b, a, mask) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no pixels"):
        rmse(a, b, np.zeros((4, 4), bool))


def test_evaluate_cases_reports_every_image(tmp_path: Path, untrained_weights: Path) -> None:
    rng = np.random.default_rng(0)
    truth = np.zeros((2, 48, 48), np.float32)
    truth[:, :4] = -1000.0
    case = tmp_path / "c1"
    for name, sigma in (("truth", 0.0), ("full_dose", 10.0), ("quarter_dose", 20.0)):
        vol = truth + rng.normal(0, sigma, truth.shape).astype(np.float32)
        make_ct_series(case, n=2, size=48, subdir=name, volume_hu=vol)
    summary = evaluate_cases(Cascade.load(untrained_weights), tmp_path)
    assert summary["n_cases"] == 1 and summary["n_slices"] == 2
    # Stored values are integers, so the measured noise is within rounding of sigma.
    assert summary["noise_std_ndct"] == pytest.approx(10.0, abs=1.0)
    assert summary["noise_std_ldct"] == pytest.approx(20.0, abs=1.5)
    assert summary["rmse_vs_ndct_ldct"] == pytest.approx(np.sqrt(10**2 + 20**2), abs=2.0)
    assert "noise_std_cascade" in summary and "rmse_vs_ndct_cascade" in summary
