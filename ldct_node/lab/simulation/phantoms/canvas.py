"""Painting phantoms: soft-edged (anti-aliased) ellipses on an HU image and label map.

Shapes are in mm, on image axes (x right, y down) about the image centre.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

#: Label codes of the phantom label map, in painting order of importance.
LABELS = {
    "air": 0,
    "skin": 1,
    "fat": 2,
    "muscle": 3,
    "bone": 4,
    "marrow": 5,
    "csf": 6,
    "vessel": 7,
    "liver": 8,
    "spleen": 9,
    "kidney": 10,
    "bowel": 11,
    "gas": 12,
    "lung": 13,
    "fluid": 14,
    "water": 15,
    "disc": 16,
    "insert": 17,
    "low_contrast": 18,
    "edge": 19,
}


@dataclass(frozen=True)
class Blob:
    """An ellipse (mm, image axes: x right, y down) with an optionally wavy outline."""

    cx: float
    cy: float
    a: float
    b: float
    angle: float = 0.0
    # (k, relative amplitude, phase): outline radius factor 1 + sum amp cos(k psi + phase)
    harmonics: tuple[tuple[int, float, float], ...] = ()

    def scaled(self, factor: float) -> Blob:
        return Blob(self.cx, self.cy, self.a * factor, self.b * factor, self.angle, self.harmonics)

    def shrunk(self, margin_mm: float) -> Blob:
        return Blob(
            self.cx,
            self.cy,
            max(self.a - margin_mm, 0.1),
            max(self.b - margin_mm, 0.1),
            self.angle,
            self.harmonics,
        )


class Canvas:
    """An HU image and label map painted with soft-edged (anti-aliased) shapes."""

    def __init__(self, size: int, spacing: float, background: float) -> None:
        self.size = size
        self.spacing = spacing
        self.image = np.full((size, size), background, dtype=np.float32)
        self.labels = np.zeros((size, size), dtype=np.uint8)
        self.centre = (size - 1) / 2.0

    def coverage(self, blob: Blob) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """Fraction of each pixel inside ``blob`` over its bounding box, or None."""
        d = self.spacing
        reach = max(blob.a, blob.b) * (1.0 + sum(abs(h[1]) for h in blob.harmonics))
        reach_px = reach / d + 2.0
        ci = blob.cy / d + self.centre
        cj = blob.cx / d + self.centre
        i0, i1 = max(0, int(ci - reach_px)), min(self.size, int(ci + reach_px) + 2)
        j0, j1 = max(0, int(cj - reach_px)), min(self.size, int(cj + reach_px) + 2)
        if i0 >= i1 or j0 >= j1 or blob.a <= 0 or blob.b <= 0:
            return None
        y = ((np.arange(i0, i1, dtype=np.float32) - self.centre) * d - blob.cy)[:, None]
        x = ((np.arange(j0, j1, dtype=np.float32) - self.centre) * d - blob.cx)[None, :]
        ca, sa = math.cos(blob.angle), math.sin(blob.angle)
        un = (x * ca + y * sa) / blob.a
        vn = (y * ca - x * sa) / blob.b
        q = np.sqrt(un * un + vn * vn)
        radius: np.ndarray | float = 1.0
        if blob.harmonics:
            psi = np.arctan2(vn, un)
            radius = 1.0 + sum(amp * np.cos(k * psi + ph) for k, amp, ph in blob.harmonics)
        # Distance to the outline ~ (q - radius) / |grad q|; |grad q| in 1/mm.
        grad = np.sqrt(np.square(un / blob.a) + np.square(vn / blob.b)) / np.maximum(q, 1e-6)
        dist_px = (q - radius) / (np.maximum(grad, 1e-6) * d)
        alpha = np.clip(0.5 - dist_px, 0.0, 1.0).astype(np.float32)
        return (slice(i0, i1), slice(j0, j1)), alpha

    def paint(
        self,
        blob: Blob,
        value: float,
        label: str,
        texture: np.ndarray | None = None,
        texture_hu: float = 0.0,
    ) -> None:
        """Paint ``value`` (+ ``texture_hu`` x texture) over what is there."""
        cov = self.coverage(blob)
        if cov is None:
            return
        box, alpha = cov
        target: np.ndarray | float = value
        if texture is not None and texture_hu:
            target = value + texture_hu * texture[box]
        region = self.image[box]
        region += alpha * (target - region)
        self.labels[box][alpha >= 0.5] = LABELS[label]

    def add_within(self, blob: Blob, delta: float, label: str) -> bool:
        """Add ``delta`` HU inside ``blob`` where the label map says ``label``."""
        cov = self.coverage(blob)
        if cov is None:
            return False
        box, alpha = cov
        inside = self.labels[box] == LABELS[label]
        if not inside.any():
            return False
        self.image[box] += delta * alpha * inside
        return True
