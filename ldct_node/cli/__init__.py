"""`ldct-node ...`: the command line (README, "Commands").

Exit status: 0 success, 1 failure, 2 bad usage or config. Errors are one line on
stderr; ``--debug`` (before the command) adds the traceback and DEBUG logging.
Only this package configures logging. :mod:`~ldct_node.cli.common` holds the app and
the error contract; the commands are in :mod:`~ldct_node.cli.offline` (``denoise``),
:mod:`~ldct_node.cli.lab` (``simulate``, ``train``, ``evaluate``) and
:mod:`~ldct_node.cli.node` (``serve``, the admin commands, ``config``, ``db``), registered
in that order (the order ``--help`` lists them).
"""

from __future__ import annotations

# The commands register in this order, the order `--help` lists them.
# isort: off
from ldct_node.cli import offline  # denoise
from ldct_node.cli import lab  # simulate, train, evaluate
from ldct_node.cli import node  # serve, the admin commands, config check, db upgrade

# isort: on
from ldct_node.cli.common import app, main

__all__ = ["app", "lab", "main", "node", "offline"]
