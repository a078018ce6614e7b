"""The water phantom: a water cylinder in air, for noise measurements."""

from __future__ import annotations

import logging

import numpy as np

from ldct_node.lab.simulation.phantoms.canvas import LABELS, Blob, Canvas
from ldct_node.lab.simulation.phantoms.objects import Phantom

logger = logging.getLogger(__name__)


def water_phantom(
    size: int, rng: np.random.Generator, slice_z: float, fov_mm: float | None
) -> Phantom:
    """A water cylinder (0 HU, 180-320 mm) in air.

    See :func:`~ldct_node.lab.simulation.phantoms.make_phantom`.
    """
    diameter = float(rng.uniform(180.0, 320.0))
    # Whole millimetres, as scanners offer: pixel spacings stay short decimals.
    fov = float(fov_mm) if fov_mm is not None else float(round(1.2 * diameter))
    spacing = fov / size
    canvas = Canvas(size, spacing, -1000.0)
    cylinder = Blob(0.0, 0.0, diameter / 2.0, diameter / 2.0)
    canvas.paint(cylinder, 0.0, "water")
    yy, xx = np.indices((size, size))
    radius_mm = np.hypot(yy - canvas.centre, xx - canvas.centre) * spacing
    masks = {
        "body": canvas.labels == LABELS["water"],
        "water": canvas.labels == LABELS["water"],
        "uniform": radius_mm < 0.3 * diameter,
    }
    masks["air"] = ~masks["body"]
    return Phantom(
        image=canvas.image,
        pixel_spacing_mm=spacing,
        kind="water",
        slice_z_mm=float(slice_z),
        masks=masks,
        params={"diameter_mm": diameter, "fov_mm": fov},
    )
