"""Smoke tests: every benchmark still runs and prints its figures (tiny sizes, no timing).

The benchmarks measure performance; these tests only keep them from rotting: each
runs end to end with a few small images and reports the figures it promises.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pydicom
import pytest
from _net_util import dcmtk_tool
from conftest import REPO, SHARED_VGG

BENCHMARKS = REPO / "benchmarks"
needs_dcmtk = pytest.mark.skipif(
    not all(dcmtk_tool(t) for t in ("storescu", "storescp", "echoscu")),
    reason="DCMTK storescu/storescp/echoscu not installed",
)


def _load(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_inference_benchmark(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "inference.json"
    result = _load("inference").main(
        [
            "--size",
            "32",
            "--batch-sizes",
            "1,2",
            "--repeats",
            "1",
            "--matmul-n",
            "128",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "slices/s" in printed and "fused_vs_keras_float32" in printed
    rows = result["rows"]
    # 2 engines x 2 precisions x 2 batch sizes, each with positive figures.
    assert len(rows) == 8
    assert all(r["slices_per_s"] > 0 and r["fraction_of_matmul"] > 0 for r in rows)
    assert result["flop_per_slice"] == 2 * 451_202 * 32 * 32
    assert json.loads(out.read_text())["ratios"].keys() == result["ratios"].keys()
    # The float32 roofline is the best matmul measured, numpy's BLAS included.
    assert result["numpy_matmul_gflops"] > 0
    assert result["matmul_gflops"]["float32"] == max(
        result["backend_matmul_gflops"]["float32"], result["numpy_matmul_gflops"]
    )
    assert "nominal CPU FMA peak" in printed
    assert result["conv_gemm_gflops"] > 0 and "convolution's shape" in printed


@needs_dcmtk
def test_ingest_benchmark(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--images", "4", "--size", "64", "--repeats", "1", "--idle-seconds", "0.5"]
    result = _load("ingest").main([*args, "--workdir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "ratio node_vs_storescp" in printed and "TCP_NODELAY=1" in printed
    rates = result["images_per_s"]
    orthanc = ["orthanc"] if _load("_common").ORTHANC_BIN else []
    shared = "ldct-node x4, 2 receiver processes"
    anchors = ("storescp", "storescp --ignore", "disk durable limit", *orthanc)
    for name in ("ldct-node", "ldct-node x4", shared, *anchors):
        assert rates[name] > 0, name
    # The ceiling is derived from two measured figures: check the arithmetic.
    per_image_ms = 1000 / rates["storescp --ignore"] + 1000 / rates["disk durable limit"]
    ceiling = rates["one-association durable ceiling"]
    assert ceiling == pytest.approx(1000 / per_image_ms)
    assert ceiling < min(rates["storescp --ignore"], rates["disk durable limit"])
    assert result["ratios"]["node_vs_one_association_ceiling"] == pytest.approx(
        rates["ldct-node"] / ceiling
    )
    assert "one-association durable ceiling" in printed
    assert set(result["ratios"]) == {
        "node_vs_storescp", "node_vs_disk_limit", "concurrent_vs_one",
        "concurrent_shared_port_vs_one", "node_vs_one_association_ceiling",
        "ceiling_vs_disk_limit",
        *(["node_vs_orthanc"] if orthanc else []),
    }  # fmt: skip
    assert set(result["handler_ms_per_instance"]) >= {"parse header", "fsync wait + rename"}
    # Read from the receiver's /metrics: NaN where no instance took the common case (4
    # images, one per association: each may be its series' first).
    per_commit = result["instances_per_intake_commit_concurrent"]
    assert math.isnan(per_commit) or 1.0 <= per_commit <= 4.0
    assert "instances per intake commit" in printed
    header = result["header_read_ms"]
    assert set(header) == {"fast read", "pydicom"} and all(ms > 0 for ms in header.values())
    assert "header read + what the handler reads from it: fast" in printed
    intake = result["intake_cpu_ms"]
    assert set(intake) == {"driver", "sqlalchemy"} and all(ms > 0 for ms in intake.values())
    assert "intake of an instance, CPU: on the driver" in printed
    assert result["idle_cpu_percent"] >= 0 and "4 idle associations" in printed


@needs_dcmtk
def test_forward_benchmark(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Orthanc as a receiver is left out: the ingest smoke test starts it already.
    args = ["--images", "4", "--size", "64", "--repeats", "1", "--no-orthanc"]
    result = _load("forward").main([*args, "--associations", "2", "--workdir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "ratio node_vs_storescu_to_storescp" in printed and "TCP_NODELAY=1" in printed
    receivers = ["storescp"]
    for receiver in receivers:
        for sender in ("storescu", "ldct-node", "ldct-node x2"):
            assert result["images_per_s"][f"{sender} -> {receiver}"] > 0
    assert set(result["ratios"]) == {
        name for r in receivers for name in (f"node_vs_storescu_to_{r}", f"node_x2_vs_one_to_{r}")
    }


@needs_dcmtk
def test_e2e_benchmark(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = _load("e2e").main(
        [
            "--slices",
            "3",
            "--size",
            "64",
            "--batch-size",
            "2",
            "--stable-seconds",
            "1",
            "--timeout",
            "120",
            "--workdir",
            str(tmp_path),
        ]
    )
    printed = capsys.readouterr().out
    assert "(end to end - stable_seconds) / model" in printed
    assert result["peers"] == "dcmtk" and "dcmtk storescu / storescp" in printed
    assert result["end_to_end_slices_per_s"] > 0
    assert result["end_to_end_s"] > result["stable_seconds"]
    assert result["model_s"] > 0 and result["stages_s"]["send"] > 0
    assert "ratio denoise_vs_engine" in printed
    assert set(result["denoise_ratios"]) == {
        "denoise_vs_engine", "denoise_vs_engine_without_loading", "pipelined_series_vs_engine"
    }  # fmt: skip
    assert all(value > 0 for value in result["denoise_ratios"].values())


@pytest.mark.skipif(not SHARED_VGG.is_file(), reason="VGG16 weights not in ../shared")
def test_train_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    result = _load("train").main(
        ["--batch-size", "2", "--patch", "16", "--steps", "1", "--warmup", "1"]
    )
    assert "patches/s" in capsys.readouterr().out
    assert all(rate > 0 for rate in result["patches_per_s"].values())


def test_python_peers_send_and_receive(tmp_path: Path) -> None:
    """``--peers python`` (the GPU machine has no DCMTK): pynetdicom's own storescp
    answers C-ECHO and stores what pynetdicom's storescu sends, over loopback."""
    common = _load("_common")  # its own copy: the choice below stays in this test
    assert common.use_peers("dcmtk") == "dcmtk"
    assert common.use_peers("python") == "python"
    with pytest.raises(ValueError, match="choice"):
        common.use_peers("orthanc")
    files = common.write_series(tmp_path / "source", 2, 32)
    received = tmp_path / "pacs" / "in"
    with common.storescp(received) as port:
        assert common.echo_ok(port, "PACS")
        common.storescu(port, "PACS", files)
        common.wait_until(
            lambda: len([p for p in received.iterdir() if p.is_file()]) == 2, 30, "2 files"
        )

    def uids(paths: list[Path]) -> list[str]:
        headers = (pydicom.dcmread(p, stop_before_pixels=True) for p in paths)
        return sorted(str(ds.SOPInstanceUID) for ds in headers)

    assert uids(list(received.iterdir())) == uids(files)
    assert not common.echo_ok(port, "PACS")  # stopped with its context
    # --ignore (the ingest benchmark's transfer-only anchor): answered, nothing written.
    ignored = tmp_path / "ignoring" / "in"
    with common.storescp(ignored, ignore=True) as ignoring_port:
        common.storescu(ignoring_port, "PACS", files)
    assert [p for p in ignored.iterdir() if p.is_file()] == []
    # pynetdicom's app ran (its log is named after the interpreter), not DCMTK's
    assert [p.name for p in (tmp_path / "pacs").glob("*.log")] == [
        f"{Path(sys.executable).name}-{port}.log"
    ]


def test_gpu_kit_names_installed_distributions() -> None:
    """benchmarks/gpu/wheels.txt names what the GPU run carries beside JAX; the fetch
    takes each at the version installed here, so each must be a distribution this
    environment has (a typo or a dropped dependency shows here, not on the device)."""
    from importlib.metadata import PackageNotFoundError, version

    names = [
        line.strip()
        for line in (BENCHMARKS / "gpu" / "wheels.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {"keras", "pydicom", "pynetdicom", "sqlalchemy", "pydantic"} <= set(names)
    missing = []
    for name in names:
        try:
            version(name)
        except PackageNotFoundError:
            missing.append(name)
    assert missing == []


def test_the_machine_line_names_the_cpu_extensions_that_set_the_figures() -> None:
    common = _load("_common")
    assert common.cpu_isa({"fpu", "avx2", "fma"}) == "avx2"
    assert common.cpu_isa({"avx2", "avx512f", "avx512_bf16"}) == "avx512f+avx512_bf16"
    assert common.cpu_isa({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}) == (
        "avx512f+avx512_bf16+amx_bf16"
    )
    assert common.cpu_isa({"sse4_2"}) == "no AVX2"
    flags = common.cpu_flags()
    assert common.machine_info()["cpu"].endswith(f"[{common.cpu_isa(flags)}]")
