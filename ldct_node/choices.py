"""The named choices of the command line, and of the code behind it, as StrEnums.

One spelling for each: ``--help`` lists the members, the CLI parses an option into its
enum (:func:`ldct_node.cli.common.choice_option`), and the tables that give the choices
their meaning take their keys from here (:data:`ldct_node.service.node.ROLES`,
:data:`ldct_node.lab.train.METHODS`, ...). Members are strings, so the functions behind
the CLI take either. Importing this module loads nothing else: the node's commands and
the lab's share it.
"""

from __future__ import annotations

import logging
from enum import StrEnum

logger = logging.getLogger(__name__)


class Role(StrEnum):
    """What one ``serve`` process runs (``serve --role``)."""

    #: Everything in one process.
    ALL = "all"
    #: The DICOM receiver and series stability.
    RECEIVER = "receiver"
    #: Denoising and forwarding.
    WORKER = "worker"


class Method(StrEnum):
    """The pipelines of the paper's comparison that ``train --method`` trains."""

    #: The cascade: perceptual DRL, then the MSE difference DRL (the paper's method).
    C = "C"
    A = "A"
    B = "B"
    D = "D"
    C_CNN10 = "C-cnn10"
    D_CNN10 = "D-cnn10"


class LrSchedule(StrEnum):
    """Learning-rate schedules (``train --lr-schedule``)."""

    CONSTANT = "constant"
    COSINE = "cosine"


class PerceptualNorm(StrEnum):
    """How the perceptual term is scaled (``train --perceptual-norm``)."""

    NONE = "none"
    CALIBRATED = "calibrated"


class Geometry(StrEnum):
    """Simulated scanner geometries (``simulate --geometry``)."""

    PARALLEL = "parallel"
    FAN = "fan"


class PhantomKind(StrEnum):
    """Procedural phantoms (``simulate --phantom``)."""

    BODY = "body"
    WATER = "water"
    QA = "qa"
