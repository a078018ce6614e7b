"""Procedural phantoms: noiseless slices in HU of known content.

:func:`make_phantom` makes one slice of a body (:mod:`.body`), water (:mod:`.water`)
or QA (:mod:`.qa`) phantom; :mod:`.objects` says what a slice holds and
:mod:`.canvas` paints them.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from ldct_node.choices import PhantomKind
from ldct_node.lab.simulation.phantoms.body import body_phantom
from ldct_node.lab.simulation.phantoms.objects import Lesion, Phantom, Region
from ldct_node.lab.simulation.phantoms.qa import qa_phantom
from ldct_node.lab.simulation.phantoms.water import water_phantom

logger = logging.getLogger(__name__)

#: The kinds of :func:`make_phantom` (:class:`~ldct_node.choices.PhantomKind`).
PHANTOM_KINDS = tuple(k.value for k in PhantomKind)

__all__ = [
    "PHANTOM_KINDS",
    "Lesion",
    "Phantom",
    "Region",
    "make_phantom",
]


def make_phantom(
    size: int,
    rng: np.random.Generator,
    *,
    kind: str = "body",
    slice_z: float = 0.0,
    fov_mm: float | None = None,
    with_lesions: bool = True,
) -> Phantom:
    """A noiseless procedural phantom slice in HU.

    Parameters
    ----------
    size
        Image size (size x size pixels), >= 16.
    rng
        Draws the patient (sizes, positions, tissue values, lesions, texture). Pass a
        fresh generator with the same seed for every slice of one case: the anatomy then
        stays the same and only ``slice_z`` moves through it.
    kind
        ``"body"``: an abdomen (skin, subcutaneous and visceral fat, abdominal wall and
        back muscles, liver, spleen, kidneys, bowel, aorta and IVC with contrast,
        vertebra with cortex and trabecular bone, ribs, lung bases at upper levels,
        3-8 spherical low-contrast lesions of 5-20 HU and 3-20 mm, organ texture).
        ``"water"``: a water cylinder (0 HU, 180-320 mm) in air.
        ``"qa"``: a CT quality-assurance phantom (see :data:`.qa.QA_INSERTS`): a water
        cylinder (190-230 mm) with sensitometry inserts of -1000 to 990 HU, 1 %
        (10 HU) discs of 3-15 mm, a uniform region and a dense rod with a sharp edge;
        ``regions`` gives every object's position and exact HU.
    slice_z
        Slice position in mm; organs grow, shrink, appear and disappear smoothly with it.
    fov_mm
        Field of view; default about the body width plus a margin (340-420 mm for the
        body, 1.2 x the diameter for water, the diameter + 60 mm for the QA phantom).
        ``pixel_spacing_mm = fov_mm / size``.
    with_lesions
        ``False`` leaves the lesions out and changes nothing else: signal-absent images
        for detectability studies.
    """
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 16:
        raise ValueError(f"size: must be an integer >= 16, got {size!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected numpy.random.Generator, got {type(rng).__name__}")
    if not math.isfinite(slice_z):
        raise ValueError(f"slice_z: must be finite, got {slice_z}")
    if fov_mm is not None and not fov_mm > 0:
        raise ValueError(f"fov_mm: must be > 0, got {fov_mm}")
    if kind == "body":
        return body_phantom(int(size), rng, float(slice_z), fov_mm, with_lesions)
    if kind == "water":
        return water_phantom(int(size), rng, float(slice_z), fov_mm)
    if kind == "qa":
        return qa_phantom(int(size), rng, float(slice_z), fov_mm)
    raise ValueError(f"kind: must be one of {PHANTOM_KINDS}, got {kind!r}")
