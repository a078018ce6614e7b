"""What a phantom slice is: the image, its masks, and the objects of known HU in it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lesion:
    """A low-contrast spherical lesion as it appears in one slice."""

    row: float
    col: float
    #: In-slice radius in pixels (the sphere's cross-section at this slice).
    radius_px: float
    #: Diameter of the sphere in mm.
    diameter_mm: float
    #: HU added to the organ background (negative: hypodense).
    contrast_hu: float
    organ: str


@dataclass(frozen=True)
class Region:
    """A circular object of known HU in a phantom slice, where image quality is measured.

    ``kind`` is ``"phantom"`` (the whole cylinder), ``"uniform"`` (a region for noise),
    ``"insert"`` (a sensitometry insert), ``"low_contrast"`` (a 1 % contrast disc) or
    ``"edge"`` (the rod whose edge gives the MTF). Positions are in pixels (row, col
    of the centre); ``hu`` is the noiseless value inside, ``background_hu`` around it.
    """

    name: str
    kind: str
    row: float
    col: float
    radius_px: float
    diameter_mm: float
    hu: float
    background_hu: float

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "row": round(self.row, 4),
            "col": round(self.col, 4),
            "radius_px": round(self.radius_px, 4),
            "diameter_mm": round(self.diameter_mm, 3),
            "hu": self.hu,
            "background_hu": self.background_hu,
        }


@dataclass(frozen=True)
class Phantom:
    """A noiseless phantom slice.

    ``masks`` maps region names to boolean (size, size) arrays. ``"body"`` (everything
    but the surrounding air) and ``"air"`` are always present; the body phantom adds
    ``"fat"``, ``"muscle"``, ``"soft_tissue"`` (muscle and parenchymal organs),
    ``"bone"`` (cortical and trabecular), ``"vessel"``, ``"liver"``, ``"spleen"``,
    ``"kidney"``, ``"bowel"``, ``"lung"`` and ``"lesion"`` (any of which may be empty at
    a given level); the water phantom adds ``"water"`` and ``"uniform"`` (a central disk
    of 60 % of the radius, for noise measurements); the QA phantom adds ``"water"``,
    ``"uniform"``, ``"insert"``, ``"low_contrast"`` and ``"edge"``, and lists every
    object with its exact HU in ``regions``.
    """

    image: np.ndarray
    pixel_spacing_mm: float
    kind: str
    slice_z_mm: float
    masks: dict[str, np.ndarray]
    lesions: tuple[Lesion, ...] = ()
    #: Case-level parameters (for provenance; plain floats and strings).
    params: dict[str, Any] = field(default_factory=dict)
    #: Objects of known HU (the QA phantom's inserts, discs, edge and uniform region).
    regions: tuple[Region, ...] = ()

    @property
    def size(self) -> int:
        return int(self.image.shape[0])
