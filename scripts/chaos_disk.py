"""The disk-full phase of scripts/chaos.py: box and hub data on small tmpfs mounts, each filled while studies flow,
held, freed; then the same census as the chaos run (lost, duplicated, corrupted, stuck all 0) and what the
senders were told meanwhile (0xA700 from the SCP, exit 6 from `wasla ingest`)."""
from __future__ import annotations

import collections
import errno
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from chaos import DISK_SIGNS, Daemon, Item, Rig, Sender, census, failures, make_studies, print_table, settled, wait_settled


def _mount_tmpfs(path: Path, mb: int) -> str | None:
    """Mount a tmpfs of `mb` MiB on `path`; None on success, else why not."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(path)], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return str(err)
    return None if out.returncode == 0 else (out.stderr.strip() or f"mount exited {out.returncode}")


def _umount(path: Path) -> None:
    for opts in ([], ["-l"]):
        if subprocess.run(["umount", *opts, str(path)], capture_output=True).returncode == 0:
            return
    print(f"[disk-full] could not unmount {path}", file=sys.stderr)


def fill(folder: Path) -> Path:
    """A filler file that takes every free byte of the file system holding `folder` (ENOSPC at the end)."""
    filler = folder / ".chaos-filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for block in (1 << 20, 1 << 16, 1 << 12, 1 << 9):
            buf = b"\0" * block
            while True:
                try:
                    os.write(fd, buf)
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return filler


def _disk_lines(d: Daemon, offset: int, limit: int = 4) -> tuple[list[str], dict[str, int]]:
    """The daemon's own "disk full" lines (distinct messages), and counts of the raw errors a full disk raised."""
    seen, said = set(), []
    counts = collections.Counter()
    for line in d.log_since(offset).splitlines():
        for sign in DISK_SIGNS.findall(line):
            counts[sign.lower()] += 1
        if "disk full" in line.lower():
            key = re.sub(r"[0-9][0-9.]{8,}", "<uid>", re.sub(r"^\S+ \S+ ", "", line))[:120]
            if key not in seen:
                seen.add(key)
                said.append(line.strip()[:220])
    return said[:limit], dict(counts)


def _full_phase(rig: Rig, sender: Sender, target: str, mount: Path, studies: list[list[Item]], hold: float,
                recover: float) -> dict:
    """Studies flow; once the first is in, `mount` is filled for `hold` s; then freed and everything must recover."""
    daemon = rig.box if target == "box" else rig.hub
    offsets = {d.name: d.log_path.stat().st_size for d in (rig.box, rig.hub)}
    pids = {d.name: d.proc.pid for d in (rig.box, rig.hub)}
    first = studies[0]
    sender.release(first)
    try:
        from harness import wait_until

        wait_until(lambda: all(i.acked for i in first), timeout=60, interval=0.2, what="first study in")
    except Exception as err:  # noqa: BLE001
        print(f"[disk-full] {target}: first study not in before the fill: {err}")
    filler = fill(mount)
    window = sender.window = collections.Counter()
    for s in studies[1:]:
        sender.release(s)
    print(f"[disk-full] {target} data full ({shutil.disk_usage(mount).free} bytes free); holding {hold:.0f} s")
    time.sleep(hold)
    alive = {d.name: d.alive() and d.proc.pid == pids[d.name] for d in (rig.box, rig.hub)}
    sender.window = None
    filler.unlink()
    dead = rig.ensure_up()
    t0 = time.monotonic()
    while time.monotonic() - t0 < recover:
        rig.ensure_up()
        if settled(rig, sender, 0):
            break
        time.sleep(1.0)
    took = time.monotonic() - t0
    lines = {d.name: _disk_lines(d, offsets[d.name]) for d in (rig.box, rig.hub)}
    after_restart = None
    if took >= recover:
        # Not recovered by itself: does a restart of the stalled side help? (Tells "stuck until restart" from
        # "stuck for good"; the next phase then starts from a flowing state.)
        daemon.kill()
        daemon.start()
        t1 = time.monotonic()
        while time.monotonic() - t1 < 60 and not settled(rig, sender, 0):
            time.sleep(1.0)
        after_restart = time.monotonic() - t1 if settled(rig, sender, 0) else -1.0
    return {"target": target, "window": dict(window), "alive": alive, "dead": dead,
            "recovered_s": took if took < recover else None, "after_restart": after_restart, "lines": lines}


def disk_full_run(args, work: Path, rng: random.Random) -> bool:
    root = work / "disk-full"
    root.mkdir(parents=True, exist_ok=True)
    mounts = [root / "data", root / "hub"]
    mounted = []
    try:
        for m in mounts:
            why = _mount_tmpfs(m, args.tmpfs_mb)
            if why is not None:
                print(f"\n[disk-full] SKIPPED: cannot mount a tmpfs on {m} ({why}); run as root to include it")
                return True
            mounted.append(m)
        rig = Rig(root, persistence=not args.no_persistence)
        groups = make_studies(root / "in", 3 + 2 * args.full_studies, args.seed + 1, rng)
        rig.start()
        sender = Sender(rig)
        sender.thread.start()
        results = []
        try:
            sender.release([i for s in groups[:3] for i in s])
            wait_settled(rig, sender, 0, 90)
            k = args.full_studies
            results.append(_full_phase(rig, sender, "box", mounts[0], groups[3:3 + k], args.hold, args.recover))
            results.append(_full_phase(rig, sender, "hub", mounts[1], groups[3 + k:], args.hold, args.recover))
        finally:
            sender.stop.set()
            rig.stop()
        items = [i for s in groups for i in s]
        c = census(rig, items)
        fails = failures(c)
        for r in results:
            print(f"\n[disk-full] {r['target']} full for {args.hold:.0f} s:")
            print(f"  what the senders were told while full: {r['window'] or 'nothing (no attempt)'}")
            print(f"  processes stayed up (same pid): box {r['alive']['box']}, hub {r['alive']['hub']}"
                  + (f"; found dead and restarted: {r['dead']}" if r["dead"] else ""))
            print("  recovered to all acknowledged in "
                  + (f"{r['recovered_s']:.0f} s" if r["recovered_s"] is not None else f"NOT within {args.recover:.0f} s"))
            if r["after_restart"] is not None:
                print(f"  after a kill -9 and restart of the {r['target']}: " + (
                    f"all acknowledged {r['after_restart']:.0f} s later" if r["after_restart"] >= 0
                    else "still not all acknowledged after 60 s"))
            for name, (lines, counts) in r["lines"].items():
                print(f"  {name} log: {len(lines)} distinct line(s) saying 'disk full'; raw error lines {counts or 0}")
                for line in lines:
                    print(f"    {line}")
        refusals = sum(n for k, n in results[0]["window"].items() if "OutOfResources" in k or "A700" in k)
        rows = {"studies / instances sent": f"{len(groups)}/{len(items)}", "acknowledged to sender": c["acked"],
                "scp refusals 0xA700 while box full": refusals,
                "box died or restarted": sum(not r["alive"]["box"] for r in results),
                "hub died or restarted": sum(not r["alive"]["hub"] for r in results),
                "phases not recovered": sum(r["recovered_s"] is None for r in results), **fails}
        print_table(f"Disk full: box and hub data on {args.tmpfs_mb} MiB tmpfs each, filled {args.hold:.0f} s", rows)
        print(f"box states: {dict(c['box_states'])}")
        bad = {k: v for k, v in rows.items() if k not in ("studies / instances sent", "acknowledged to sender",
                                                          "scp refusals 0xA700 while box full")}
        return not any(bad.values())
    finally:
        for m in reversed(mounted):
            _umount(m)
