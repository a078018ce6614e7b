"""Low-dose CT simulation in the projection domain, and procedural anatomical phantoms.

Training pairs are made the way the AAPM low-dose challenge made them: the noiseless
line integrals of an image are turned into expected photon counts ``I0 * exp(-p)``,
Poisson noise is drawn once at the full-dose count and once, independently, at
``I0 * dose_fraction``, Gaussian electronic noise is added, the log is taken and both
sinograms are reconstructed by filtered back-projection (FBP).

- :mod:`.projector`: the parallel-beam projector, FBP and its filters, fan-beam
  rebinning;
- :mod:`.scan`: :func:`simulate_scan`, a full-dose and a low-dose scan of one slice,
  and the dose and noise defaults;
- :mod:`.phantoms`: :func:`make_phantom`, body, water and QA phantoms of known HU;
- :mod:`.dataset`: :func:`simulate_dataset`, paired series on disk with their
  ``simulation.json``, as :class:`SimulationParameters` (:mod:`.parameters`) say,
  built from :mod:`.cases` (phantom patients or source series) and :mod:`.slices`
  (one slice made, scanned and measured, in worker processes too).

Units: images are HU; lengths are mm; ``mu`` is the linear attenuation in 1/mm.
"""

from __future__ import annotations

from ldct_node.lab.simulation.cases import DEFAULT_SLICES_PER_CASE
from ldct_node.lab.simulation.dataset import (
    FULL_DOSE_DIR,
    MANIFEST_NAME,
    TRUTH_DIR,
    TRUTH_RECON_DIR,
    low_dose_dir_name,
    simulate_dataset,
)
from ldct_node.lab.simulation.parameters import SimulationParameters
from ldct_node.lab.simulation.phantoms import (
    PHANTOM_KINDS,
    Lesion,
    Phantom,
    Region,
    make_phantom,
)
from ldct_node.lab.simulation.phantoms.qa import (
    QA_EDGE_DIAMETER_MM,
    QA_EDGE_HU,
    QA_INSERT_DIAMETER_MM,
    QA_INSERTS,
    QA_LOW_CONTRAST_HU,
    QA_LOW_CONTRAST_MM,
    QA_UNIFORM_RADIUS_MM,
)
from ldct_node.lab.simulation.projector import (
    DEFAULT_FILTER,
    FAN_SOURCE_TO_ISO_MM,
    FILTERS,
    GEOMETRIES,
    default_n_angles,
    fbp,
    n_detectors,
    project,
)
from ldct_node.lab.simulation.scan import (
    ELECTRONIC_NOISE_AT_512,
    I0_AT_512,
    MIN_COUNTS,
    MU_WATER_PER_MM,
    ScanResult,
    default_electronic_noise,
    default_i0,
    simulate_scan,
)

__all__ = [
    "DEFAULT_FILTER",
    "DEFAULT_SLICES_PER_CASE",
    "ELECTRONIC_NOISE_AT_512",
    "FAN_SOURCE_TO_ISO_MM",
    "FILTERS",
    "FULL_DOSE_DIR",
    "GEOMETRIES",
    "I0_AT_512",
    "MANIFEST_NAME",
    "MIN_COUNTS",
    "MU_WATER_PER_MM",
    "PHANTOM_KINDS",
    "QA_EDGE_DIAMETER_MM",
    "QA_EDGE_HU",
    "QA_INSERTS",
    "QA_INSERT_DIAMETER_MM",
    "QA_LOW_CONTRAST_HU",
    "QA_LOW_CONTRAST_MM",
    "QA_UNIFORM_RADIUS_MM",
    "TRUTH_DIR",
    "TRUTH_RECON_DIR",
    "Lesion",
    "Phantom",
    "Region",
    "ScanResult",
    "SimulationParameters",
    "default_electronic_noise",
    "default_i0",
    "default_n_angles",
    "fbp",
    "low_dose_dir_name",
    "make_phantom",
    "n_detectors",
    "project",
    "simulate_dataset",
    "simulate_scan",
]
