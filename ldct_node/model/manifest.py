"""weights/MANIFEST.json: the one module that reads and writes the format.

A weights folder holds one ``*.weights.h5`` per network and ``MANIFEST.json``:
``format`` (:data:`MANIFEST_FORMAT`), ``model_version``, ``networks`` (per role: the
builder in :data:`ldct_node.model.networks.NETWORK_BUILDERS`, the file, its sha256 and
parameter count), ``pipeline`` (the stages in order: network role and whether it outputs
the image or a difference to subtract), ``method``, and provenance (recipe, data,
metrics, history, software, evaluation) that inference does not read.
:class:`Manifest` is what inference relies on; :func:`read_raw` and :func:`write_raw`
give the lab (trainer, evaluation) the whole document.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldct_node.fsutil import write_text_atomic

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = 1
#: What a pipeline stage outputs: the image, or a difference map subtracted from its input.
STAGE_OUTPUTS = ("image", "difference")
#: The paper's cascade; the pipeline of a manifest that names none.
DEFAULT_PIPELINE: tuple[tuple[str, str], ...] = (
    ("perceptual", "image"),
    ("difference", "difference"),
)


class WeightsError(RuntimeError):
    """Weights that cannot be used: missing, corrupt or not matching their manifest."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_raw(weights_dir: Path) -> dict[str, Any]:
    """The whole manifest of ``weights_dir`` as parsed JSON (no checks)."""
    raw: dict[str, Any] = json.loads((weights_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    return raw


def write_raw(
    weights_dir: Path,
    manifest: dict[str, Any],
    *,
    allow_nan: bool = True,
    default: Callable[[Any], Any] | None = None,
) -> Path:
    """Write ``manifest`` as ``weights_dir/MANIFEST.json`` (indented, durably)."""
    text = json.dumps(manifest, indent=2, allow_nan=allow_nan, default=default) + "\n"
    return write_text_atomic(weights_dir / MANIFEST_NAME, text)


@dataclass(frozen=True)
class NetworkEntry:
    role: str
    builder: str
    file: str
    sha256: str
    parameters: int


@dataclass(frozen=True)
class Manifest:
    """The parts of weights/MANIFEST.json that inference relies on; the rest is provenance.

    ``pipeline`` lists (network role, output) in order; manifests without one (every
    weights folder before the comparison methods) are the cascade, DEFAULT_PIPELINE.
    """

    model_version: str
    networks: dict[str, NetworkEntry]
    raw: dict[str, Any] = field(default_factory=dict, compare=False)
    pipeline: tuple[tuple[str, str], ...] = DEFAULT_PIPELINE
    method: str = "C"

    @classmethod
    def read(cls, weights_dir: Path) -> Manifest:
        path = weights_dir / MANIFEST_NAME
        if not path.is_file():
            raise WeightsError(f"{path}: no {MANIFEST_NAME} (is weights_dir right?)")
        try:
            raw = read_raw(weights_dir)
            if raw.get("format") != MANIFEST_FORMAT:
                raise WeightsError(
                    f"{path}: manifest format {raw.get('format')!r}, expected {MANIFEST_FORMAT}"
                )
            if "pipeline" in raw:
                pipeline = tuple((str(s["network"]), str(s["output"])) for s in raw["pipeline"])
            else:
                pipeline = DEFAULT_PIPELINE
            if not pipeline:
                raise ValueError("empty pipeline")
            for role, output in pipeline:
                if output not in STAGE_OUTPUTS:
                    raise ValueError(f"stage {role!r}: output {output!r} not in {STAGE_OUTPUTS}")
            networks = {
                role: NetworkEntry(
                    role=role,
                    builder=str(raw["networks"][role]["builder"]),
                    file=str(raw["networks"][role]["file"]),
                    sha256=str(raw["networks"][role]["sha256"]),
                    parameters=int(raw["networks"][role]["parameters"]),
                )
                for role, _ in pipeline
            }
            return cls(
                model_version=str(raw["model_version"]),
                networks=networks,
                raw=raw,
                pipeline=pipeline,
                method=str(raw.get("method", "C")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f"{path}: malformed manifest ({exc!r})") from None
