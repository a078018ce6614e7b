"""Held-out metrics: RMSE and noise against a known truth."""

from __future__ import annotations

import numpy as np
import pytest

from ldct_node.lab.metrics import noise_std, rmse


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
