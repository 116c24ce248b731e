"""`auto`'s timing run in a child process: the daemon then loads only the winner, never both runtimes at once.

Timing both backends in the daemon left the loser's runtime and session resident for weeks (about 50 MB of the
daemon's 330 MB peak in scripts/bench_pipeline.py). The child verifies the package again (same trusted keys), times
every installed backend exactly as `_fastest` does in process, and prints its verdict as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", type=Path, required=True)
    ap.add_argument("--key", type=Path, action="append", default=[])
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--providers", default="[]")
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args(argv)
    from edge import modelpkg
    from edge.inference import _fastest

    pkg = modelpkg.load_package(a.folder, modelpkg.load_trusted_keys(a.key) if a.key else {})
    backend = _fastest(pkg, a.threads, json.loads(a.providers), a.warmup)
    print(json.dumps({"backend": backend.TYPE_KEY, "precision": backend.precision,
                      "median_ms": getattr(backend, "auto_medians", {})}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
