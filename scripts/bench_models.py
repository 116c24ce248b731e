"""Latency (batch 1, median / p95), load time and peak RSS of the triage model on ONNX Runtime and OpenVINO,
FP32 and INT8, 1 and 2 threads; every configuration runs in a fresh process so its RSS is its own.

    python scripts/bench_models.py [--package models/cxr-triage/1.1.0] [--fp32 work-data/cxr-triage-1.1.0/model.fp32.onnx]

The FP32 ONNX is not part of the package: it is taken from the work folder, or re-exported from the work
folder's checkpoint when torch is installed; without either, the FP32 rows are skipped (said so in the output).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOAL_INT8_MS = 5.0
GOAL_OV_SPEEDUP = 1.4


def cpu_isa() -> str:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "avx512_bf16")
    found = [f for f in wanted if f in flags]
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return " ".join(found) + (f" (ONEDNN_MAX_CPU_ISA={cap})" if cap else "")


def worker(backend: str, model: str, threads: int, precision: str | None, runs: int, seconds: float) -> dict:
    import numpy as np

    t0 = time.perf_counter()
    if backend == "ort":
        import onnxruntime as ort
    else:
        import openvino as ov
    rss_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t1 = time.perf_counter()
    info = {}
    if backend == "ort":
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        inp = session.get_inputs()[0]
        x = np.random.default_rng(0).standard_normal(inp.shape).astype(np.float32)
        infer = lambda: session.run(None, {inp.name: x})  # noqa: E731
        info["precision"] = "int8 (QDQ u8s8)" if "int8" in Path(model).name else "f32"
        info["version"] = ort.__version__
    else:
        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        compiled = core.compile_model(core.read_model(model), "CPU", config)
        request = compiled.create_infer_request()
        shape = list(compiled.input(0).shape)
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        infer = lambda: request.infer({0: x})  # noqa: E731
        info["precision"] = f"INFERENCE_PRECISION_HINT={compiled.get_property('INFERENCE_PRECISION_HINT')}"
        info["capabilities"] = " ".join(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        info["version"] = ov.__version__
    infer()
    load_ms = (time.perf_counter() - t1) * 1000
    for _ in range(20):
        infer()
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < runs and time.perf_counter() < deadline:
        start = time.perf_counter()
        infer()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return dict(info, median_ms=statistics.median(times), p95_ms=times[int(0.95 * (len(times) - 1))],
                runs=len(times), load_ms=load_ms, import_ms=(t1 - t0) * 1000, rss_import_mb=rss_import,
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def find_fp32(explicit: Path | None, work: Path) -> tuple[Path | None, str]:
    if explicit:
        return (explicit, "given") if explicit.is_file() else (None, f"{explicit} does not exist")
    fp32 = work / "model.fp32.onnx"
    if fp32.is_file():
        return fp32, f"work folder {fp32}"
    checkpoint = work / "checkpoint.pt"
    if checkpoint.is_file():
        try:
            sys.path.insert(0, str(REPO))
            from models.pipeline.model import export_onnx, load_checkpoint

            model, meta = load_checkpoint(checkpoint)
            export_onnx(model, meta["image_size"], fp32)
            return fp32, f"re-exported from {checkpoint}"
        except ImportError as err:
            return None, f"cannot re-export from {checkpoint}: {err}"
    return None, f"no {fp32} and no checkpoint to re-export it from (run the pipeline's train and export steps)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, default=REPO / "models" / "cxr-triage" / "1.1.0")
    parser.add_argument("--work", type=Path, default=REPO / "work-data" / "cxr-triage-1.1.0")
    parser.add_argument("--fp32", type=Path, help="FP32 ONNX (default: from --work)")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=15.0, help="time cap per configuration")
    parser.add_argument("--worker", nargs=4, metavar=("BACKEND", "MODEL", "THREADS", "PRECISION"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        backend, model, threads, precision = args.worker
        print(json.dumps(worker(backend, model, int(threads), None if precision == "-" else precision,
                                args.runs, args.seconds)))
        return 0

    int8_onnx, int8_xml = args.package / "model.int8.onnx", args.package / "openvino" / "model.xml"
    if not int8_onnx.is_file() or not int8_xml.is_file():
        print(f"no package at {args.package}: build it with scripts/build_model.py")
        return 1
    fp32, fp32_note = find_fp32(args.fp32, args.work)
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, ISA flags: {cpu_isa()}")
    print(f"package: {args.package}")
    print(f"FP32 ONNX: {fp32_note}" + ("" if fp32 else " -> FP32 rows SKIPPED"))
    configs = []
    for threads in (1, 2):
        if fp32:
            configs += [("ORT FP32", "ort", fp32, threads, "-"),
                        ("OpenVINO FP32 (default hint)", "ov", fp32, threads, "-"),
                        ("OpenVINO FP32 (hint f32)", "ov", fp32, threads, "f32")]
        configs += [("ORT INT8", "ort", int8_onnx, threads, "-"),
                    ("OpenVINO INT8", "ov", int8_xml, threads, "-")]
    results = {}
    print(f"\n{'configuration':30} {'thr':>3} {'median ms':>9} {'p95 ms':>8} {'load ms':>8} {'peak RSS MB':>11}  precision")
    for name, backend, model, threads, precision in configs:
        out = subprocess.run([sys.executable, __file__, "--runs", str(args.runs), "--seconds", str(args.seconds),
                              "--worker", backend, str(model), str(threads), precision],
                             capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        if out.returncode != 0:
            print(f"{name:30} {threads:>3} FAILED: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results[(name, threads)] = r
        print(f"{name:30} {threads:>3} {r['median_ms']:9.2f} {r['p95_ms']:8.2f} {r['load_ms']:8.0f} "
              f"{r['peak_rss_mb']:11.0f}  {r['precision']}", flush=True)
    caps = next((r["capabilities"] for r in results.values() if "capabilities" in r), "?")
    print(f"\nOpenVINO CPU capabilities: {caps}; versions: " + ", ".join(
        sorted({f"{n.split()[0]} {r['version']}" for (n, _), r in results.items()})))
    print("peak RSS = ru_maxrss of the fresh process (runtime import + model load + inference); "
          "import alone: " + ", ".join(sorted({f"{n.split()[0]} {r['rss_import_mb']:.0f} MB"
                                               for (n, _), r in results.items()})))

    print("\nGoals:")
    int8 = [(r["median_ms"], n, t) for (n, t), r in results.items() if "INT8" in n]
    if int8:
        best = min(int8)
        verdict = "PASS" if best[0] <= GOAL_INT8_MS else "FAIL"
        print(f"  fastest INT8 <= {GOAL_INT8_MS} ms: {verdict} ({best[1]}, {best[2]} thread(s): {best[0]:.2f} ms)")
    for threads in (1, 2):
        q, f = results.get(("OpenVINO INT8", threads)), results.get(("OpenVINO FP32 (hint f32)", threads))
        if q and f:
            speedup = f["median_ms"] / q["median_ms"]
            verdict = "PASS" if speedup >= GOAL_OV_SPEEDUP else "FAIL"
            print(f"  OpenVINO INT8 >= {GOAL_OV_SPEEDUP}x faster than OpenVINO FP32 (f32), {threads} thread(s): "
                  f"{verdict} ({speedup:.2f}x)")
        else:
            print(f"  OpenVINO INT8 vs FP32, {threads} thread(s): not measured (FP32 model missing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
