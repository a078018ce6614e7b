"""TensorFlow's start-up lines on stderr, held back from operators.

TensorFlow's C++ libraries log a few INFO lines while they load, before absl's logging
is set up, so ``TF_CPP_MIN_LOG_LEVEL`` does not reach them. On CPUs with AVX-512 VNNI
or BF16 (where oneDNN's operations are on by default) every command that loads the
networks printed, twice::

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:1796210390.429560   16451 port.cc:153] oneDNN custom operations are on...

The first import of ``tensorflow`` therefore runs with file descriptor 2 on a temporary
file; afterwards everything it wrote goes to stderr except those two kinds of line
(absl INFO lines, the absl notice). Warnings and errors pass, in their order.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from types import ModuleType

#: absl's INFO prefix: severity I, MMDD, time, thread id, file:line].
_ABSL_INFO = re.compile(rb"^I\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^ \]]+:\d+\] ")
_ABSL_NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called"


def filtered(text: bytes) -> bytes:
    """``text`` without absl's INFO lines and its "before InitializeLog" notice."""
    kept = [
        line
        for line in text.splitlines(keepends=True)
        if not (_ABSL_INFO.match(line) or line.startswith(_ABSL_NOTICE))
    ]
    return b"".join(kept)


class _HeldStderrLoader(importlib.abc.Loader):
    """Runs the wrapped loader's ``exec_module`` with fd 2 on a temporary file."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> object:
        # The rest of the loader's interface (get_filename, get_resource_reader, ...)
        # for whatever looks at ``tensorflow.__loader__`` later.
        return getattr(self._loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                self._loader.exec_module(module)
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                held.seek(0)
                rest = filtered(held.read())
                if rest:
                    os.write(2, rest)


class _FirstTensorFlowImport(importlib.abc.MetaPathFinder):
    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once; and so that the lookup below is the usual one
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _HeldStderrLoader(spec.loader)
        return spec


def hold_tensorflow_startup_chatter() -> bool:
    """Filter what the first ``import tensorflow`` writes to stderr (see the module).

    Nothing to do (False) when TensorFlow is already imported, or when
    ``TF_CPP_MIN_LOG_LEVEL`` is set to 0 (INFO wanted). Returns whether the filter is
    installed.
    """
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "").strip() == "0":
        return False
    if not any(isinstance(finder, _FirstTensorFlowImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _FirstTensorFlowImport())
    return True
