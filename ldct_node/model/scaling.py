"""HU <-> the networks' model range: HU -1024..3072 maps linearly to 0..1.

The networks were trained on that range; pixels outside it (padding outside the field of
view, dense metal) are clipped on the way in (the cascade keeps their input values).
"""

from __future__ import annotations

import numpy as np

HU_MIN = -1024.0
HU_RANGE = 4096.0


def hu_to_model(hu: np.ndarray) -> np.ndarray:
    """HU -> model range (float32), clipped to the range the networks were trained on."""
    clipped = np.clip(np.asarray(hu, dtype=np.float32), HU_MIN, HU_MIN + HU_RANGE)
    return (clipped - HU_MIN) / np.float32(HU_RANGE)


def model_to_hu(values: np.ndarray) -> np.ndarray:
    """Model range -> HU (float32); inverse of :func:`hu_to_model` inside the range."""
    return np.asarray(values, dtype=np.float32) * np.float32(HU_RANGE) + np.float32(HU_MIN)
