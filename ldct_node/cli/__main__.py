"""``python -m ldct_node.cli``: the same as the ``ldct-node`` console script."""

from __future__ import annotations

import sys

from ldct_node.cli import main

sys.exit(main())
