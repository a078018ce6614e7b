"""Round trip through a PACS nobody here wrote: Orthanc (Debian package ``orthanc``).

Orthanc and ``ldct-node serve`` run as real processes on 127.0.0.1 with free ports and
know each other as DICOM peers. A series is uploaded to Orthanc over its REST API,
Orthanc C-STOREs it to the node, the node sends one derived series per output profile
back, and everything is checked over Orthanc's REST API: same study, new series UIDs,
every instance, the derived tags, the pixels, and ``dciodvfy`` on what Orthanc stored.
The Prometheus endpoint of the same node is scraped over HTTP.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from _dicom_util import HAVE_DCIODVFY, dciodvfy_errors, make_ct_series, make_ct_volume
from _enhanced_util import write_enhanced_ct
from _net_util import LOOPBACK, free_port
from _node_util import Serve, cli, needs_storescp, start_serve, stop_serve, wait_for, write_config
from _orthanc_util import Orthanc, needs_orthanc, running_orthanc
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from ldct_node.config import CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE
from ldct_node.dicom.derive import derived_series_uid
from ldct_node.dicom.enhanced import decode_frames_hu
from ldct_node.dicom.io import decode_hu
from ldct_node.store import Database, JobState

pytestmark = [needs_orthanc, needs_storescp, pytest.mark.slow]

MODEL_VERSION = "test-untrained"  # of the untrained_weights fixture
NODE_AET = "LDCT_NODE"
PROFILES = {
    # name: (blend, suffix, offset)
    "denoised": (0.0, " [LDCT denoised]", 1000),
    "blend30": (0.3, " [LDCT blend 0.3]", 2000),
}
WAIT_S = 180


@dataclass
class Setup:
    orthanc: Orthanc
    serve: Serve
    config: Path
    db: Database
    metrics_port: int
    folder: Path

    def node_log(self) -> str:
        return self.serve.log()[-4000:]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, untrained_weights: Path) -> Iterator[Setup]:
    folder = tmp_path_factory.mktemp("orthanc-rt")
    node_port = free_port()
    metrics_port = free_port()
    with running_orthanc(folder / "orthanc", {"ldct": (NODE_AET, node_port)}) as orthanc:
        config = write_config(
            folder / "node",
            untrained_weights,
            node={"port": node_port, "ae_title": NODE_AET},
            series={
                "stable_seconds": 1,
                "accept_sop_classes": [CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE],
            },
            outputs=[
                {
                    "name": "denoised",
                    "blend": 0.0,
                    "destinations": ["orthanc"],
                },
                {
                    "name": "blend30",
                    "blend": 0.3,
                    "series_description_suffix": PROFILES["blend30"][1],
                    "series_number_offset": PROFILES["blend30"][2],
                },
            ],
            destinations=[
                {
                    "name": "orthanc",
                    "ae_title": orthanc.ae_title,
                    "host": LOOPBACK,
                    "port": orthanc.dicom_port,
                    # Each derived series over two associations at once: the round
                    # trips check that a real PACS gets every instance that way.
                    "associations": 2,
                }
            ],
            metrics={"enabled": True, "host": LOOPBACK, "port": metrics_port},
        )
        serve = start_serve(config, node_port, ae_title=NODE_AET)
        db = Database(f"sqlite:///{config.parent / 'node.db'}")
        try:
            yield Setup(orthanc, serve, config, db, metrics_port, folder)
        finally:
            db.close()
            stop_serve(serve)


def _send_through_orthanc(setup: Setup, files: list[Path]) -> dict[str, Any]:
    """Upload ``files`` to Orthanc, have it C-STORE their series to the node."""
    answers = [setup.orthanc.upload(path) for path in files]
    series_id = answers[0]["ParentSeries"]
    result = setup.orthanc.post(
        "/modalities/ldct/store", {"Resources": [series_id], "Synchronous": True}
    )
    assert result is not None and int(result.get("FailedInstancesCount", 0)) == 0, result
    return dict(setup.orthanc.get(f"/series/{series_id}"))


def _wait_for_derived(setup: Setup, source_series_uid: str, n_instances: int) -> dict[str, Any]:
    """Wait until Orthanc holds every derived series with all its instances."""
    found: dict[str, Any] = {}

    def probe() -> bool:
        for name in PROFILES:
            uid = derived_series_uid(source_series_uid, MODEL_VERSION, name, "")
            series = setup.orthanc.series_by_uid(uid)
            if series is None or len(series["Instances"]) != n_instances:
                return False
            found[name] = series
        return True

    wait_for(
        probe,
        timeout=WAIT_S,
        interval=0.5,
        what="the derived series in Orthanc",
        details=setup.node_log,
    )
    return found


def _jobs_done(setup: Setup, source_series_uid: str) -> None:
    def probe() -> bool:
        jobs = [j for j in setup.db.list_jobs() if j.series_instance_uid == source_series_uid]
        return len(jobs) == len(PROFILES) and all(j.state == JobState.DONE for j in jobs)

    wait_for(probe, timeout=WAIT_S, interval=0.2, what="both jobs done", details=setup.node_log)


def _values(value: Any) -> list[str]:
    """A simplified-tags multi-value ("A\\B") as a list."""
    return str(value).split("\\") if value not in (None, "") else []


# ------------------------------------------------------------------------------------


def test_echo_both_ways(setup: Setup) -> None:
    # Orthanc -> node (Orthanc's own SCU, through its REST API).
    assert setup.orthanc.post("/modalities/ldct/echo", {}) is not None
    # Node -> Orthanc (the admin command, from the node's AE title).
    result = cli("echo", "orthanc", "--config", setup.config)
    assert result.returncode == 0, result.stderr
    assert "succeeded" in result.stdout


def test_classic_ct_round_trip(setup: Setup, tmp_path: Path) -> None:
    study_uid = generate_uid()
    files = make_ct_series(
        tmp_path, n=4, size=32, study_uid=study_uid, series_description="Chest LD"
    )
    sources = [pydicom.dcmread(p) for p in files]
    source_uid = str(sources[0].SeriesInstanceUID)
    source_sops = {str(ds.SOPInstanceUID) for ds in sources}
    source_series = _send_through_orthanc(setup, files)
    derived = _wait_for_derived(setup, source_uid, len(files))
    _jobs_done(setup, source_uid)

    # Orthanc files the derived series under the source's study, next to the source.
    study_series = setup.orthanc.study_series(source_series["ParentStudy"])
    assert {s["MainDicomTags"]["SeriesInstanceUID"] for s in study_series} == {
        source_uid,
        *(s["MainDicomTags"]["SeriesInstanceUID"] for s in derived.values()),
    }
    source_errors = set(dciodvfy_errors(files[0])) if HAVE_DCIODVFY else set()
    hu_by_profile: dict[str, dict[str, np.ndarray]] = {}
    for name, series in derived.items():
        blend, suffix, offset = PROFILES[name]
        assert series["ParentStudy"] == source_series["ParentStudy"]
        hu_by_profile[name] = {}
        for k, instance_id in enumerate(series["Instances"]):
            tags = setup.orthanc.tags(instance_id)
            assert tags["StudyInstanceUID"] == study_uid
            assert tags["SeriesInstanceUID"] != source_uid
            assert tags["SOPInstanceUID"] not in source_sops
            assert tags["SOPClassUID"] == CT_IMAGE_STORAGE
            assert tags["FrameOfReferenceUID"] == sources[0].FrameOfReferenceUID
            assert _values(tags["ImageType"])[:2] == ["DERIVED", "SECONDARY"]
            assert int(tags["SeriesNumber"]) == int(sources[0].SeriesNumber) + offset
            assert tags["SeriesDescription"] == "Chest LD" + suffix
            assert f"blend {blend:g}" in tags["DerivationDescription"]
            refs = tags["SourceImageSequence"]
            assert len(refs) == 1 and refs[0]["ReferencedSOPInstanceUID"] in source_sops
            equipment = tags["ContributingEquipmentSequence"]
            assert equipment[-1]["Manufacturer"] == "ldct-node"
            # The file as Orthanc stored it: valid DICOM, same pixels as sent.
            path = setup.orthanc.download(instance_id, tmp_path / f"{name}-{k}.dcm")
            if HAVE_DCIODVFY:
                assert set(dciodvfy_errors(path)) - source_errors == set()
            ds = pydicom.dcmread(path)
            hu_by_profile[name][str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)] = (
                decode_hu(ds)
            )
        # Every source instance has exactly one derived instance.
        assert set(hu_by_profile[name]) == source_sops

    # Pixels: the cascade changed them, and blend 0.3 is 0.7 x denoised + 0.3 x input.
    for ds in sources:
        sop = str(ds.SOPInstanceUID)
        source_hu = decode_hu(ds)
        denoised = hu_by_profile["denoised"][sop]
        blended = hu_by_profile["blend30"][sop]
        assert float(np.mean(np.abs(denoised - source_hu))) > 1.0
        np.testing.assert_allclose(blended, 0.7 * denoised + 0.3 * source_hu, atol=1.0)
    # Both profiles came from one cascade run.
    assert "reusing the cascade output" in setup.serve.log()


def test_enhanced_ct_round_trip(setup: Setup, tmp_path: Path) -> None:
    volume = make_ct_volume(3, 32, seed=5)
    source_path = write_enhanced_ct(volume, tmp_path / "enhanced.dcm")
    source = pydicom.dcmread(source_path)
    source_uid = str(source.SeriesInstanceUID)
    _send_through_orthanc(setup, [source_path])
    derived = _wait_for_derived(setup, source_uid, 1)
    _jobs_done(setup, source_uid)

    source_errors = set(dciodvfy_errors(source_path)) if HAVE_DCIODVFY else set()
    source_hu = decode_frames_hu(source)
    frames_hu = {}
    for name, series in derived.items():
        path = setup.orthanc.download(series["Instances"][0], tmp_path / f"{name}.dcm")
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == ENHANCED_CT_IMAGE_STORAGE
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert int(ds.NumberOfFrames) == 3
        assert list(ds.ImageType)[:1] == ["DERIVED"]
        shared = ds.SharedFunctionalGroupsSequence[0]
        assert shared.CTImageFrameTypeSequence[0].FrameType[0] == "DERIVED"
        for number, frame in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
            reference = frame.DerivationImageSequence[0].SourceImageSequence[0]
            assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
            assert int(reference.ReferencedFrameNumber) == number
            # Geometry travels with each frame unchanged.
            assert (
                frame.PlanePositionSequence[0].ImagePositionPatient
                == source.PerFrameFunctionalGroupsSequence[number - 1]
                .PlanePositionSequence[0]
                .ImagePositionPatient
            )
        if HAVE_DCIODVFY:
            assert set(dciodvfy_errors(path)) - source_errors == set()
        frames_hu[name] = decode_frames_hu(ds)
    assert float(np.mean(np.abs(frames_hu["denoised"] - source_hu))) > 1.0
    np.testing.assert_allclose(
        frames_hu["blend30"], 0.7 * frames_hu["denoised"] + 0.3 * source_hu, atol=1.0
    )


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_endpoint_counts_a_round_trip(setup: Setup, tmp_path: Path) -> None:
    before = _scrape(setup.metrics_port)
    files = make_ct_series(tmp_path, n=3, size=32, seed=9)
    source_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    _send_through_orthanc(setup, files)
    _wait_for_derived(setup, source_uid, 3)
    _jobs_done(setup, source_uid)

    expected = {
        ("ldct_node_instances_received_total", (("outcome", "stored"),)): 3,
        ("ldct_node_jobs_processed_total", (("profile", "denoised"),)): 1,
        ("ldct_node_jobs_processed_total", (("profile", "blend30"),)): 1,
        ("ldct_node_series_forwarded_total", (("destination", "orthanc"),)): 2,
        ("ldct_node_instances_forwarded_total", (("destination", "orthanc"),)): 6,
        ("ldct_node_job_processing_seconds_count", (("profile", "denoised"),)): 1,
        ("ldct_node_job_latency_seconds_count", (("profile", "denoised"),)): 1,
        ("ldct_node_job_latency_seconds_count", (("profile", "blend30"),)): 1,
        ("ldct_node_jobs", (("state", "done"),)): 2,
        # The series' first instance makes it (not the common case), the next two are
        # each committed alone: one association sends one instance at a time.
        ("ldct_node_intake_commits_total", ()): 2,
        ("ldct_node_intake_committed_instances_total", ()): 2,
    }

    def deltas() -> dict[Any, float]:
        after = _scrape(setup.metrics_port)
        return {key: after.get(key, 0.0) - before.get(key, 0.0) for key in expected}

    # The counters follow the database commit by a moment: poll, do not race.
    wait_for(
        lambda: deltas() == expected,
        timeout=30,
        interval=0.3,
        what=f"metric deltas {expected}",
        details=lambda: json.dumps({str(k): v for k, v in deltas().items()}),
    )
    after = _scrape(setup.metrics_port)
    assert after.get(("ldct_node_jobs_failed_total", (("stage", "processing"),)), 0.0) == 0.0
    # And the health check for monitoring agrees: exit 0, healthy.
    result = cli("status", "--config", setup.config, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["healthy"] is True
