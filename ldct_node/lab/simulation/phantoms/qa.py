"""The CT quality-assurance phantom: sensitometry inserts, 1 % discs, a uniform region
and an edge rod, every object with its exact HU."""

from __future__ import annotations

import logging
import math

import numpy as np

from ldct_node.lab.simulation.phantoms.canvas import LABELS, Blob, Canvas
from ldct_node.lab.simulation.phantoms.objects import Phantom, Region

logger = logging.getLogger(__name__)

#: Sensitometry inserts of the QA phantom: (name, nominal HU). The materials of the
#: CT-number modules of the standard QA phantoms, from air to a Teflon-like plastic.
QA_INSERTS: tuple[tuple[str, float], ...] = (
    ("air", -1000.0),
    ("pmp", -200.0),
    ("ldpe", -100.0),
    ("polystyrene", -35.0),
    ("acrylic", 120.0),
    ("delrin", 340.0),
    ("bone_50", 725.0),
    ("teflon", 990.0),
)
#: Diameters (mm) of the QA phantom's low-contrast discs, all +QA_LOW_CONTRAST_HU over water.
QA_LOW_CONTRAST_MM: tuple[float, ...] = (15.0, 12.0, 9.0, 7.0, 5.0, 3.0)
#: Contrast of the low-contrast discs: 1 % of the water attenuation.
QA_LOW_CONTRAST_HU = 10.0
#: The edge rod (MTF): a dense rod with a sharp circular edge.
QA_EDGE_HU = 1000.0
QA_EDGE_DIAMETER_MM = 25.0
QA_INSERT_DIAMETER_MM = 12.0
#: Radius (mm) of the central uniform region used for noise.
QA_UNIFORM_RADIUS_MM = 20.0
# Ring radii (mm) of the low-contrast discs and of the inserts + edge rod.
_QA_DISC_RING_MM = 38.0
_QA_INSERT_RING_MM = 64.0


def qa_phantom(
    size: int, rng: np.random.Generator, slice_z: float, fov_mm: float | None
) -> Phantom:
    """A water cylinder with CT-number inserts, 1 % discs, a uniform region and an edge.

    Laid out like the standard CT QA phantoms (one slice holds every module): a
    central uniform region, six low-contrast discs on an inner ring, and on an outer
    ring eight sensitometry inserts and a dense rod whose edge gives the MTF. Each
    case draws the diameter (190-230 mm), a rotation and a small off-centre shift, so
    training sees variety; the phantom is the same at every ``slice_z``.
    """
    diameter = float(rng.uniform(190.0, 230.0))
    rotation = float(rng.uniform(0.0, 2.0 * math.pi))
    shift_x, shift_y = (float(v) for v in rng.uniform(-8.0, 8.0, size=2))
    fov = float(fov_mm) if fov_mm is not None else float(round(diameter + 60.0))
    spacing = fov / size
    canvas = Canvas(size, spacing, -1000.0)
    regions: list[Region] = []

    def add(name: str, kind: str, x: float, y: float, d_mm: float, hu: float, label: str) -> None:
        canvas.paint(Blob(x, y, d_mm / 2.0, d_mm / 2.0), hu, label)
        regions.append(
            Region(
                name=name,
                kind=kind,
                row=y / spacing + canvas.centre,
                col=x / spacing + canvas.centre,
                radius_px=d_mm / 2.0 / spacing,
                diameter_mm=d_mm,
                hu=hu,
                background_hu=-1000.0 if kind == "phantom" else 0.0,
            )
        )

    def at(ring: float, angle: float) -> tuple[float, float]:
        return shift_x + ring * math.cos(angle), shift_y + ring * math.sin(angle)

    add("cylinder", "phantom", shift_x, shift_y, diameter, 0.0, "water")
    for k, d_mm in enumerate(QA_LOW_CONTRAST_MM):
        x, y = at(_QA_DISC_RING_MM, rotation + k * math.pi / 3.0)
        add(f"disc_{d_mm:g}mm", "low_contrast", x, y, d_mm, QA_LOW_CONTRAST_HU, "low_contrast")
    step = 2.0 * math.pi / (len(QA_INSERTS) + 1)
    for k, (name, hu) in enumerate(QA_INSERTS):
        x, y = at(_QA_INSERT_RING_MM, rotation + k * step)
        add(name, "insert", x, y, QA_INSERT_DIAMETER_MM, hu, "insert")
    x, y = at(_QA_INSERT_RING_MM, rotation + len(QA_INSERTS) * step)
    add("edge_rod", "edge", x, y, QA_EDGE_DIAMETER_MM, QA_EDGE_HU, "edge")
    # The uniform region is not painted (it is water); it only marks where to measure.
    regions.append(
        Region(
            name="uniform",
            kind="uniform",
            row=shift_y / spacing + canvas.centre,
            col=shift_x / spacing + canvas.centre,
            radius_px=QA_UNIFORM_RADIUS_MM / spacing,
            diameter_mm=2.0 * QA_UNIFORM_RADIUS_MM,
            hu=0.0,
            background_hu=0.0,
        )
    )
    lab = canvas.labels
    yy, xx = np.indices((size, size))
    uniform = regions[-1]
    masks = {
        "air": lab == LABELS["air"],
        "body": lab != LABELS["air"],
        "water": lab == LABELS["water"],
        "uniform": np.hypot(yy - uniform.row, xx - uniform.col) < uniform.radius_px,
        "insert": lab == LABELS["insert"],
        "low_contrast": lab == LABELS["low_contrast"],
        "edge": lab == LABELS["edge"],
    }
    return Phantom(
        image=canvas.image,
        pixel_spacing_mm=spacing,
        kind="qa",
        slice_z_mm=float(slice_z),
        masks=masks,
        params={
            "diameter_mm": diameter,
            "fov_mm": fov,
            "rotation_rad": rotation,
            "shift_mm": [shift_x, shift_y],
        },
        regions=tuple(regions),
    )
