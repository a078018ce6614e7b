"""Inference benchmark: cascade slices/s and model GFLOP/s vs a matmul roofline.

For each engine (fused graph, Keras models), precision and batch size it times the
cascade on ``--size`` x ``--size`` slices, interleaved, best of ``--repeats``.
Model FLOPs follow the issue's definition, 2 x parameters x pixels per network
(451,202 parameters in the two DRLs: 236.6 GFLOP per 512x512 slice). The roofline
is the best square matmul of the same dtype timed in the same process, on the same
device: the backend's own and, for float32 on a CPU, numpy's BLAS (often faster); the
CPU's nominal FMA peak is printed beside it.

Backend: whatever ``KERAS_BACKEND`` says (tensorflow by default; jax on a GPU box).

    .venv/bin/python benchmarks/inference.py                      # 512x512, fp32 + bf16
    .venv/bin/python benchmarks/inference.py --batch-sizes 1,2,4,8 --json out.json
    KERAS_BACKEND=jax python benchmarks/inference.py --device gpu --batch-sizes 32,64
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore", category=DeprecationWarning)

import numpy as np  # noqa: E402
from _common import BUNDLED_WEIGHTS, cpu_flags, ct_volume, report  # noqa: E402

MATMUL_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "mixed_float16": "float16"}


@functools.cache
def _tf_matmul() -> Any:
    """One compiled matmul for the whole run (a new tf.function per call retraces)."""
    import tensorflow as tf

    return tf.function(tf.linalg.matmul, autograph=False)


def matmul_gflops(n: int, dtype: str, repeats: int) -> float:
    """GFLOP/s of an ``n x n`` matmul in ``dtype`` on the active backend (compiled)."""
    import keras

    rng = np.random.default_rng(0)
    a = keras.ops.convert_to_tensor(rng.standard_normal((n, n)).astype(np.float32), dtype)
    b = keras.ops.convert_to_tensor(rng.standard_normal((n, n)).astype(np.float32), dtype)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        fn = _tf_matmul()

        def run() -> None:
            fn(a, b).numpy()

    elif backend == "jax":
        import jax

        jfn = jax.jit(lambda x, y: x @ y)

        def run() -> None:
            jfn(a, b).block_until_ready()

    else:

        def run() -> None:
            keras.ops.convert_to_numpy(keras.ops.matmul(a, b))

    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e9


def _numpy_gemm_gflops(m: int, k: int, n: int, repeats: int) -> float:
    """GFLOP/s of numpy's float32 ``m x k @ k x n`` (its BLAS), best of ``repeats``."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * m * k * n / best / 1e9


def numpy_matmul_gflops(n: int, repeats: int) -> float:
    """GFLOP/s of an ``n x n`` float32 matmul in numpy (its BLAS, e.g. OpenBLAS): a
    second roofline, often faster on CPUs than the backend's own."""
    return _numpy_gemm_gflops(n, n, n, repeats)


#: Rows of the convolution-shaped GEMM: a 128x128 tile of pixels, as a blocked
#: convolution would hand one to BLAS (a whole 512x512 slice would need 600 MB).
CONV_GEMM_ROWS = 16_384


def conv_gemm_gflops(repeats: int, rows: int = CONV_GEMM_ROWS) -> float:
    """GFLOP/s of numpy's float32 GEMM in the shape of one hidden 3x3 64 -> 64
    convolution written as a matrix product (``rows`` pixels x 576 @ 576 x 64): what
    the same BLAS reaches on the model's own arithmetic, beside its square matmul."""
    return _numpy_gemm_gflops(rows, 9 * 64, 64, repeats)


def fma_peak_gflops() -> tuple[float, str] | None:
    """The CPU's nominal float32 FMA peak: cores x clock x FLOP per cycle, assuming two
    FMA units of the widest vector the flags show (AVX-512: 16 lanes, AVX2: 8). None
    where /proc/cpuinfo says too little. A ceiling to print beside the measured
    matmuls, not a measurement."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    flags = cpu_flags()
    if not mhz:
        return None
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    cores = os.cpu_count() or len(mhz)
    peak = cores * max(mhz) / 1e3 * lanes * 2 * 2
    return peak, f"{cores} cores x {max(mhz) / 1e3:.2f} GHz x {lanes} lanes x 2 FMA units x 2"


def low_precision_error(
    cascades: dict[tuple[str, str], Any], ct_slice: Path | None = None
) -> dict[str, float]:
    """RMS HU difference of each reduced precision to float32 on a real CT slice.

    The slice is ``ct_slice``, else pydicom-data's 512x512 CT (held out from training);
    skipped without it.
    """
    try:
        import pydicom

        from ldct_node.dicom.io import decode_hu

        if ct_slice is None:
            from pydicom.data import get_testdata_file

            found = get_testdata_file("693_UNCR.dcm")
            if found is None:
                return {}
            ct_slice = Path(str(found))
        hu = decode_hu(pydicom.dcmread(ct_slice))[None]
    except Exception:  # pydicom-data missing or offline: the accuracy line is optional
        return {}
    errors = {}
    for (engine, precision), cascade in cascades.items():
        reference = cascades.get((engine, "float32"))
        if precision == "float32" or reference is None:
            continue
        diff = cascade.denoise(hu).astype(np.float64) - reference.denoise(hu)
        errors[f"{engine} {precision}"] = float(np.sqrt(np.mean(diff**2)))
    return errors


def device_name(device: str) -> str:
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return str(jax.devices()[0].device_kind)
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return "GPU" if gpus and device != "cpu" else "CPU"
    return backend


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=BUNDLED_WEIGHTS)
    parser.add_argument("--size", type=int, default=512, help="slice size (pixels)")
    parser.add_argument(
        "--slices", type=int, default=0, help="slices per timing (default 2 x batch)"
    )
    parser.add_argument("--batch-sizes", default="1,4", help="comma-separated")
    parser.add_argument("--precisions", default="float32,bfloat16", help="comma-separated")
    parser.add_argument("--engines", default="fused,keras", help="fused and/or keras")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--matmul-n", type=int, default=2048)
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="device peak for the precision (e.g. 989 for H100 bf16)",
    )
    parser.add_argument(
        "--ct-slice",
        type=Path,
        help="a real CT slice for the reduced precisions' HU error (default: pydicom-data's "
        "693_UNCR.dcm, fetched if missing)",
    )
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    import keras

    from ldct_node.malloc import huge_pages_in_use
    from ldct_node.model.cascade import Cascade
    from ldct_node.model.fused import native_dilation

    backend = keras.backend.backend()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    precisions = args.precisions.split(",")
    engines = args.engines.split(",")
    print(
        f"backend {backend}, device {device_name(args.device)}, {args.size}x{args.size} slices, "
        f"malloc huge pages {'on' if huge_pages_in_use() else 'off'}"
        + (
            f", dilated convolutions {'native' if native_dilation() else 'by space-to-batch'}"
            if backend == "tensorflow"
            else ""
        )
    )

    cascades: dict[tuple[str, str], Cascade] = {}
    for engine in engines:
        for precision in precisions:
            cascade = Cascade.load(
                args.weights, device=args.device, precision=precision, engine=engine
            )
            if cascade.engine != engine:
                continue
            cascades[(engine, precision)] = cascade
    any_cascade = next(iter(cascades.values()))
    params = sum(int(net.count_params()) for net in any_cascade.model.layers[1:3])
    flop_per_slice = 2.0 * params * args.size * args.size

    # Warm up every configuration (compilation, oneDNN primitive caches), then time them
    # in turn so that load from other processes hits all of them alike.
    volume = ct_volume(max(batch_sizes) * 2, args.size)
    configs = [(e, p, b) for (e, p) in cascades for b in batch_sizes]
    best = {c: float("inf") for c in configs}
    mm_dtypes = sorted({MATMUL_DTYPES[p] for p in precisions})
    mm_best = {d: 0.0 for d in mm_dtypes}
    for config in configs:
        engine, precision, batch = config
        cascade = cascades[(engine, precision)]
        cascade.batch_size = batch
        cascade.denoise(volume[:batch])
    numpy_best = conv_gemm = 0.0
    for _ in range(args.repeats):
        for d in mm_dtypes:
            mm_best[d] = max(mm_best[d], matmul_gflops(args.matmul_n, d, 1))
        if args.device != "gpu":
            numpy_best = max(numpy_best, numpy_matmul_gflops(args.matmul_n, 1))
            conv_gemm = max(conv_gemm, conv_gemm_gflops(1))
        for config in configs:
            engine, precision, batch = config
            cascade = cascades[(engine, precision)]
            cascade.batch_size = batch
            n = args.slices or 2 * batch
            start = time.perf_counter()
            cascade.denoise(volume[:n])
            best[config] = min(best[config], (time.perf_counter() - start) / n)

    rows = []
    backend_mm = dict(mm_best)
    # The roofline is the best matmul measured in this run, whoever ran it: dividing by
    # the backend's own alone flatters a backend with a slow matmul.
    if numpy_best and "float32" in mm_best:
        mm_best["float32"] = max(mm_best["float32"], numpy_best)
    print(
        f"matmul {args.matmul_n}^3 GFLOP/s, {backend}: "
        + ", ".join(f"{d} {g:.0f}" for d, g in backend_mm.items())
        + (f"; numpy float32 {numpy_best:.0f}" if numpy_best else "")
        + "; roofline = the best of these ("
        + ", ".join(f"{d} {g:.0f}" for d, g in mm_best.items())
        + ")"
    )
    peak = fma_peak_gflops() if args.device != "gpu" else None
    if peak is not None:
        print(f"nominal CPU FMA peak float32: {peak[0]:.0f} GFLOP/s ({peak[1]})")
    if conv_gemm:
        print(
            f"numpy float32 GEMM in a 3x3 64->64 convolution's shape ({CONV_GEMM_ROWS} x 576 "
            f"@ 576 x 64): {conv_gemm:.0f} GFLOP/s"
            + (
                f" = {conv_gemm / mm_best['float32']:.2f} x the roofline"
                if "float32" in mm_best
                else ""
            )
        )
    print(f"model: {params:,} parameters, {flop_per_slice / 1e9:.1f} GFLOP per slice")
    print(
        f"{'engine':7s} {'precision':13s} {'batch':>5s} {'slices/s':>9s} "
        f"{'GFLOP/s':>8s} {'/matmul':>8s}"
    )
    for config in configs:
        engine, precision, batch = config
        per_slice = best[config]
        gflops = flop_per_slice / per_slice / 1e9
        ratio = gflops / mm_best[MATMUL_DTYPES[precision]]
        row = {
            "engine": engine,
            "precision": precision,
            "batch_size": batch,
            "slices_per_s": 1.0 / per_slice,
            "model_gflops": gflops,
            "matmul_gflops": mm_best[MATMUL_DTYPES[precision]],
            "fraction_of_matmul": ratio,
        }
        if args.peak_tflops:
            row["fraction_of_peak"] = gflops / (args.peak_tflops * 1e3)
        rows.append(row)
        print(
            f"{engine:7s} {precision:13s} {batch:5d} {1.0 / per_slice:9.3f} "
            f"{gflops:8.1f} {ratio:8.2f}"
            + (f"  {row['fraction_of_peak']:.3f} of peak" if args.peak_tflops else "")
        )

    def fastest(engine: str, precision: str) -> float:
        return max(
            (
                r["slices_per_s"]
                for r in rows
                if r["engine"] == engine and r["precision"] == precision
            ),
            default=0.0,
        )

    ratios: dict[str, float] = {}
    if fastest("fused", "float32") and fastest("keras", "float32"):
        ratios["fused_vs_keras_float32"] = fastest("fused", "float32") / fastest("keras", "float32")
    if fastest("fused", "bfloat16") and fastest("fused", "float32"):
        ratios["bfloat16_vs_float32_fused"] = fastest("fused", "bfloat16") / fastest(
            "fused", "float32"
        )
    if fastest("keras", "bfloat16") and fastest("keras", "float32"):
        ratios["mixed_bfloat16_vs_float32_keras"] = fastest("keras", "bfloat16") / fastest(
            "keras", "float32"
        )
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")
    accuracy = low_precision_error(cascades, args.ct_slice)
    for name, value in accuracy.items():
        print(f"RMS difference to float32 on a real CT slice, {name}: {value:.3f} HU")
    result = {
        "huge_pages": huge_pages_in_use(),
        "backend": backend,
        "device": device_name(args.device),
        "size": args.size,
        "flop_per_slice": flop_per_slice,
        "matmul_gflops": mm_best,
        "backend_matmul_gflops": backend_mm,
        "numpy_matmul_gflops": numpy_best,
        "conv_gemm_gflops": conv_gemm or None,
        "fma_peak_gflops": peak[0] if peak else None,
        "rows": rows,
        "ratios": ratios,
        "rms_hu_vs_float32": accuracy,
    }
    report("inference", result, args.json)
    return result


if __name__ == "__main__":
    # As the node's commands run (ldct_node.malloc); LDCT_NODE_HUGE_PAGES=0 for without.
    from ldct_node.malloc import reexec_with_huge_pages

    reexec_with_huge_pages()
    main()
