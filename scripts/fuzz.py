"""Fuzz the box's untrusted-DICOM reader, the hub's decoder and the MQTT wire decoder (docs/fuzzing.md).

    .venv/bin/python scripts/fuzz.py --minutes 30 --seed 1            # all three targets, time shared equally
    .venv/bin/python scripts/fuzz.py --minutes 5 --target wire
    .venv/bin/python scripts/fuzz.py --replay work-data/fuzz/dicom-0123456789ab.bin

Each case runs in a worker process limited to --memory-mb of address space and --timeout seconds; a hang, a
memory blow-up, a native crash or any exception outside sync.core.errors is a crash. Each distinct crash is saved once,
as a .bin (the input) and a .json (target, topic, mutation, traceback), under --out. Exit code 1 when any crash.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

import fuzz_targets  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--target", action="append", choices=fuzz_targets.TARGETS,
                        help="repeatable; default: all of %(choices)s")
    parser.add_argument("--out", type=Path, default=REPO / "work-data" / "fuzz", help="reproducers (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=fuzz_targets.CASE_SECONDS, help="seconds per case")
    parser.add_argument("--memory-mb", type=int, default=fuzz_targets.MEMORY_LIMIT >> 20)
    parser.add_argument("--replay", type=Path, help="run one saved reproducer and print its result")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.replay:
        result = fuzz_targets.replay(args.replay, args.timeout)
        print(json.dumps(result, indent=1))
        return 1 if result["status"] == "crash" else 0
    report = fuzz_targets.fuzz(args.minutes * 60, args.seed, targets=tuple(args.target or fuzz_targets.TARGETS),
                               out_dir=args.out, timeout=args.timeout, memory=args.memory_mb << 20,
                               progress=lambda r: print(f"... {dict(r.cases)} cases, {len(r.crashes)} crashes",
                                                        file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps({"cases": dict(report.cases), "crashes": {k: {"count": v["count"], "mutation": v["mutation"],
                          "reproducer": v.get("reproducer")} for k, v in report.crashes.items()},
                          "outcomes": {k: dict(v) for k, v in report.outcomes.items()},
                          "worker_starts": report.worker_starts}, indent=1))
    else:
        print(f"seed {args.seed}, {args.minutes:g} min, timeout {args.timeout:g} s, memory {args.memory_mb} MiB")
        print(report.summary())
    return 1 if report.crashes else 0


if __name__ == "__main__":
    sys.exit(main())
