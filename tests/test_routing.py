"""Output profiles and routing: which series get which profiles, where each one goes.

Unit tests of :mod:`ldct_node.service.routing` and the config checks, then a running node (in
this process, real associations over loopback) with three profiles, two DCMTK
``storescp`` PACS and DCMTK ``storescu`` as scanners with different AE titles.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from _dicom_util import make_ct_series, make_ct_volume
from _enhanced_util import write_enhanced_ct
from _net_util import LOOPBACK, dcmtk, node_settings
from _node_util import needs_storescp, storescp, wait_for
from pydicom.dataset import Dataset

from ldct_node.config import ConfigError, OutputProfile, parse_settings
from ldct_node.dicom.derive import derived_series_uid
from ldct_node.model.cascade import Cascade
from ldct_node.service.node import Node
from ldct_node.service.receive import NO_MATCHING_PROFILE
from ldct_node.service.routing import (
    convolution_kernels,
    destinations_for,
    matching_profiles,
    profile_applies,
)
from ldct_node.store import JobState


def _header(description: str = "", kernel: Any = None) -> Dataset:
    ds = Dataset()
    ds.SeriesDescription = description
    if kernel is not None:
        ds.ConvolutionKernel = kernel
    return ds


def test_filters_all_must_match_and_empty_filters_match_everything() -> None:
    any_series = OutputProfile(name="all")
    strict = OutputProfile(
        name="strict",
        calling_aets=["CT1"],
        series_descriptions=["*low dose*", "LD *"],
        convolution_kernels=["B30*"],
    )
    assert profile_applies(any_series, calling_aet="X", series_description="", kernels=[])
    ok = {"calling_aet": "ct1 ", "series_description": "Chest LOW DOSE 1mm", "kernels": ["B30f"]}
    assert profile_applies(strict, **ok)
    assert not profile_applies(strict, **{**ok, "calling_aet": "CT2"})
    assert not profile_applies(strict, **{**ok, "series_description": "Chest standard"})
    assert not profile_applies(strict, **{**ok, "kernels": ["B70f"]})
    assert not profile_applies(strict, **{**ok, "kernels": []})  # no kernel: no match
    # Any value of a multi-valued kernel may match; patterns are globs.
    assert profile_applies(strict, **{**ok, "kernels": ["Br40", "B30s"]})
    assert profile_applies(strict, **{**ok, "series_description": "LD chest"})
    assert [
        p.name for p in matching_profiles(_header("LD x", "B30f"), "CT1", [any_series, strict])
    ] == [
        "all",
        "strict",
    ]


def test_convolution_kernel_of_classic_and_enhanced_ct(tmp_path: Path) -> None:
    assert convolution_kernels(_header(kernel="B30f")) == ["B30f"]
    assert convolution_kernels(_header(kernel=["Br40", "3"])) == ["Br40", "3"]
    assert convolution_kernels(_header()) == []
    path = write_enhanced_ct(make_ct_volume(2, 16), tmp_path / "e.dcm", convolution_kernel="FC13")
    assert convolution_kernels(pydicom.dcmread(path, stop_before_pixels=True)) == ["FC13"]


def test_destinations_config_and_validation() -> None:
    dests = [
        {"name": "a", "ae_title": "A", "host": LOOPBACK, "port": 104},
        {"name": "b", "ae_title": "B", "host": LOOPBACK, "port": 105},
    ]
    settings = parse_settings(
        {"outputs": [{"name": "x", "destinations": ["b"]}, {"name": "y"}], "destinations": dests}
    )
    assert destinations_for(settings.outputs[0], settings) == ["b"]
    assert destinations_for(settings.outputs[1], settings) == ["a", "b"]
    assert settings.metrics.enabled is False and settings.metrics.host == "127.0.0.1"
    with pytest.raises(ConfigError, match=r"names destination.*nowhere"):
        parse_settings(
            {"outputs": [{"name": "x", "destinations": ["nowhere"]}], "destinations": dests}
        )
    with pytest.raises(ConfigError, match=r"outputs\[0\]\.calling_aets"):
        parse_settings({"outputs": [{"name": "x", "calling_aets": ["A" * 17]}]})
    with pytest.raises(ConfigError, match=r"outputs\[0\]\.series_descriptions"):
        parse_settings({"outputs": [{"name": "x", "series_descriptions": [" "]}]})
    with pytest.raises(ConfigError, match=r"unknown key 'outputs\[0\]\.kernels'"):
        parse_settings({"outputs": [{"name": "x", "kernels": ["B30f"]}]})


# ------------------------------------------------------------------------------------
# A running node
# ------------------------------------------------------------------------------------


class _CountingCascade:
    """The real cascade, counting the slices it is asked to denoise."""

    def __init__(self, cascade: Cascade) -> None:
        self._cascade = cascade
        self.slices = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cascade, name)

    def denoise(self, slices_hu: np.ndarray, **kwargs: Any) -> np.ndarray:
        self.slices += 1 if np.ndim(slices_hu) == 2 else len(slices_hu)
        return self._cascade.denoise(slices_hu, **kwargs)


@pytest.fixture
def cascade(untrained_weights: Path) -> Iterator[_CountingCascade]:
    yield _CountingCascade(Cascade.load(untrained_weights, batch_size=4, device="cpu"))


def _send(port: int, calling_aet: str, files: list[Path]) -> None:
    result = dcmtk(
        "storescu", "-aet", calling_aet, "-aec", "LDCT_NODE", "-to", "20", "-ta", "20",
        "-td", "30", LOOPBACK, str(port), *files,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@needs_storescp
@pytest.mark.slow
def test_profiles_route_series_to_their_destinations(
    tmp_path: Path, cascade: _CountingCascade
) -> None:
    with (
        storescp(tmp_path / "pacs_a", ae_title="PACS_A") as pacs_a,
        storescp(tmp_path / "pacs_b", ae_title="PACS_B") as pacs_b,
    ):
        settings = node_settings(
            tmp_path,
            series={"stable_seconds": 0.5},
            forward={"backoff_seconds": [1], "max_attempts": 3},
            outputs=[
                # Soft-kernel low-dose series -> PACS A, as the paper's plain output.
                {
                    "name": "soft",
                    "blend": 0.0,
                    "series_descriptions": ["*low dose*"],
                    "destinations": ["pacs_a"],
                },
                # Sharp kernels -> PACS B, blended.
                {
                    "name": "sharp",
                    "blend": 0.3,
                    "series_description_suffix": " [LDCT sharp]",
                    "series_number_offset": 2000,
                    "convolution_kernels": ["B70*", "LUNG"],
                    "destinations": ["pacs_b"],
                },
                # Everything scanner CT1 sends -> every destination.
                {"name": "ct1", "calling_aets": ["CT1"], "series_number_offset": 3000},
            ],
            destinations=[
                {"name": "pacs_a", "ae_title": "PACS_A", "host": LOOPBACK, "port": pacs_a.port},
                {"name": "pacs_b", "ae_title": "PACS_B", "host": LOOPBACK, "port": pacs_b.port},
            ],
        )
        study = pydicom.uid.generate_uid()
        low_dose = make_ct_series(
            tmp_path, n=3, size=32, seed=1, study_uid=study, subdir="s1",
            series_description="Chest low dose", extra={"ConvolutionKernel": "B30f"},
        )  # fmt: skip
        lung = make_ct_series(
            tmp_path, n=3, size=32, seed=2, study_uid=study, subdir="s2",
            series_description="Lung", extra={"ConvolutionKernel": "B70f"},
        )  # fmt: skip
        head = make_ct_series(
            tmp_path, n=3, size=32, seed=3, study_uid=study, subdir="s3",
            series_description="Head", extra={"ConvolutionKernel": "H30s"},
        )  # fmt: skip
        uids = {
            key: str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
            for key, files in (("low_dose", low_dose), ("lung", lung), ("head", head))
        }
        node = Node(settings, cascade=cascade)  # type: ignore[arg-type]
        node.start()
        try:
            port = node.address[1]
            _send(port, "CT2", low_dose)
            _send(port, "CT1", lung)
            _send(port, "CT2", head)
            assert node.db is not None
            db = node.db

            def all_done() -> bool:
                jobs = db.list_jobs()
                return len(jobs) == 3 and all(j.state == JobState.DONE for j in jobs)

            wait_for(
                all_done,
                timeout=120,
                interval=0.2,
                what="3 jobs done",
                details=lambda: str(db.list_jobs()),
            )
            jobs = {(j.series_instance_uid, j.profile) for j in db.list_jobs()}
            # Jobs only for the profiles that apply; none at all for the head series.
            assert jobs == {
                (uids["low_dose"], "soft"),
                (uids["lung"], "sharp"),
                (uids["lung"], "ct1"),
            }
            head_series = [j for j in db.list_jobs() if j.series_instance_uid == uids["head"]]
            assert head_series == []
            with db.session(read_only=True) as sess:
                from ldct_node.store import Instance, Series

                reasons = {
                    row.skip_reason
                    for row in sess.query(Instance)
                    .join(Series)
                    .filter(Series.series_instance_uid == uids["head"])
                }
            assert reasons == {NO_MATCHING_PROFILE}

            def expected(source: str, profile: str) -> str:
                return derived_series_uid(source, cascade.model_version, profile, "")

            def received(pacs: Any) -> set[str]:
                return {str(ds.SeriesInstanceUID) for ds in pacs.datasets()}

            wait_for(
                lambda: len(pacs_a.datasets()) == 6 and len(pacs_b.datasets()) == 6,
                timeout=30,
                what="6 instances at each PACS",
            )
            assert received(pacs_a) == {
                expected(uids["low_dose"], "soft"),
                expected(uids["lung"], "ct1"),
            }
            assert received(pacs_b) == {
                expected(uids["lung"], "sharp"),
                expected(uids["lung"], "ct1"),
            }
            by_series = {str(ds.SeriesInstanceUID): ds for ds in pacs_b.datasets()}
            sharp = by_series[expected(uids["lung"], "sharp")]
            assert int(sharp.SeriesNumber) == 2 + 2000
            assert sharp.SeriesDescription == "Lung [LDCT sharp]"
            # Two profiles of the lung series, one cascade run: 3 + 3 slices, not 3 + 6.
            assert cascade.slices == 6
            assert node.worker is not None and node.worker.cascade_runs == 2
        finally:
            node.stop()
