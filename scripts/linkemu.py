"""`linkemu.py`: the command line over linkemu_lib — bring an emulated GEO/LEO link up, down, or run/bench across it."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from linkemu_lib import (  # noqa: E402,F401  (re-exported: `from linkemu import LinkEmulator` works too)
    BOX_IP, HUB_IP, PROFILES, LinkEmuError, LinkEmulator, LinkProfile, ping, resolve_profile, tcp_goodput,
    teardown,
)

PID_DIR = Path("/run/linkemu")


def parse_rate(text: str) -> float:
    """'256k', '1M', '5mbit', '256000' -> bit/s; '0' means unlimited."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgG]?)(?:bit|bps|b)?(?:/s)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (examples: 256k, 1M, 5Mbit)")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]


def _add_link_args(p: argparse.ArgumentParser, prefix_default: str = "wl1") -> None:
    p.add_argument("--profile", default="geo", choices=sorted(PROFILES), help="base profile (default geo)")
    p.add_argument("--prefix", default=prefix_default, help="namespaces are PREFIX-box and PREFIX-hub")
    p.add_argument("--rate", type=parse_rate, help="rate both ways, bit/s with k/M suffix (0 = unlimited)")
    p.add_argument("--rate-up", type=parse_rate, help="rate box->hub only")
    p.add_argument("--rate-down", type=parse_rate, help="rate hub->box only")
    p.add_argument("--delay", type=float, metavar="MS", help="one-way delay in ms (RTT is twice this)")
    p.add_argument("--loss", type=float, metavar="PCT", help="random loss per direction in percent")
    p.add_argument("--queue-bytes", type=int, help="modem buffer per direction; tail drop beyond it")
    p.add_argument("--cut-every", type=float, metavar="S", help="a scheduled cut every S seconds (0 = none)")
    p.add_argument("--cut-for", type=float, metavar="S", help="each scheduled cut lasts S seconds")
    p.add_argument("--seed", type=int, help="seed of the loss draws, for repeatable runs")


def _link(args) -> LinkEmulator:
    return LinkEmulator(args.profile, prefix=args.prefix, seed=args.seed, rate_bps=args.rate,
                        rate_up_bps=args.rate_up, rate_down_bps=args.rate_down, delay_ms=args.delay,
                        loss_pct=args.loss, queue_bytes=args.queue_bytes, cut_every_s=args.cut_every,
                        cut_for_s=args.cut_for)


def cmd_up(args) -> int:
    link = _link(args)
    link.start(threaded=False)
    fwd = link.forwarder
    pidfile = PID_DIR / f"{args.prefix}.pid"
    try:
        PID_DIR.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(str(os.getpid()))
        signal.signal(signal.SIGTERM, lambda *_: fwd.stop())
        signal.signal(signal.SIGINT, lambda *_: fwd.stop())
        signal.signal(signal.SIGUSR1, lambda *_: link.set_down(True))
        signal.signal(signal.SIGUSR2, lambda *_: link.set_down(False))
        print(f"box: netns {link.box_ns} {link.box_ip}/30 dev emu0", flush=True)
        print(f"hub: netns {link.hub_ns} {link.hub_ip}/30 dev emu0", flush=True)
        print(f"link: {args.profile}: {link.profile.describe()}", flush=True)
        print(f"ready: pid {os.getpid()}; SIGUSR1 cuts, SIGUSR2 restores, SIGTERM tears down "
              f"(or: linkemu.py down --prefix {args.prefix})", flush=True)
        fwd.run()
        print("stats: " + json.dumps(link.stats()), flush=True)
    finally:
        link.stop()
        pidfile.unlink(missing_ok=True)
    return 0


def _alive(pid: int) -> bool:
    """True while `pid` runs; an exited child its parent has not reaped yet (state Z) counts as gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cmd_down(args) -> int:
    pidfile = PID_DIR / f"{args.prefix}.pid"
    if pidfile.exists():
        pid = int(pidfile.read_text().strip() or 0)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            cmdline = b""
        if pid and b"linkemu" in cmdline:  # only the forwarder `up` started, never a reused pid
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not _alive(pid):
                    break
                time.sleep(0.1)
        pidfile.unlink(missing_ok=True)
    removed = teardown(args.prefix)
    print("removed: " + (" ".join(removed) if removed else "nothing (no namespace left)"))
    return 0


def cmd_run(args) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise LinkEmuError("nothing to run; put the box-side command after --")
    with _link(args) as link:
        print(f"ready: {link.box_ns} {BOX_IP} <-> {link.hub_ns} {HUB_IP}: {link.profile.describe()}", flush=True)
        rc = link.run_in("box", cmd).returncode
        print("stats: " + json.dumps(link.stats()), file=sys.stderr)
    return rc


def cmd_bench(args) -> int:
    with _link(args) as link:
        print(f"link: {args.profile}: {link.profile.describe()}", flush=True)
        pr = ping(link, count=args.pings, interval=0.2)
        if pr.rtts_ms:
            print(f"ping: {len(pr.rtts_ms)}/{pr.sent} replies, loss {pr.loss_pct:.0f} %, RTT min/avg/max "
                  f"{min(pr.rtts_ms):.0f}/{pr.avg_ms:.0f}/{max(pr.rtts_ms):.0f} ms", flush=True)
        else:
            print(f"ping: 0/{pr.sent} replies", flush=True)
        for direction in args.directions.split(","):
            g = tcp_goodput(link, seconds=args.seconds, direction=direction)
            print(f"tcp {direction}: {g['bytes']} B in {g['seconds']:.1f} s = {g['bps'] / 1000:.1f} kbit/s", flush=True)
        print("stats: " + json.dumps(link.stats()), flush=True)
    return 0


def cmd_profiles(args) -> int:
    for name, prof in PROFILES.items():
        print(f"{name:9} {prof.describe()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="linkemu.py", formatter_class=fmt,
        description="Emulate the clinic's satellite link between two network namespaces (needs root).\n"
                    "Example: python scripts/linkemu.py up --profile geo --prefix wl1")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", formatter_class=fmt, help="create the namespaces and forward until SIGTERM",
                        description="Create PREFIX-box (10.77.0.1) and PREFIX-hub (10.77.0.2) and forward in the "
                                    "foreground until SIGTERM/Ctrl-C, then remove them.\n"
                                    "Example: python scripts/linkemu.py up --profile geo-cuts --prefix wl1 --loss 2")
    _add_link_args(up)
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", formatter_class=fmt, help="stop a running `up` and remove its namespaces",
                          description="Stop the `up` forwarder of PREFIX and delete its namespaces; safe to repeat.\n"
                                      "Example: python scripts/linkemu.py down --prefix wl1")
    down.add_argument("--prefix", default="wl1", help="namespaces are PREFIX-box and PREFIX-hub")
    down.set_defaults(func=cmd_down)
    run = sub.add_parser("run", formatter_class=fmt, help="run one command in the box namespace over the link",
                         description="Bring the link up, run the command inside PREFIX-box, tear down; exits with "
                                     "the command's status.\n"
                                     "Example: python scripts/linkemu.py run --profile geo -- ping -c 3 10.77.0.2")
    _add_link_args(run)
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="command to run in the box namespace, after --")
    run.set_defaults(func=cmd_run)
    bench = sub.add_parser("bench", formatter_class=fmt, help="measure RTT and TCP goodput across a profile",
                           description="Ping across, then bulk TCP in each direction, and print the figures.\n"
                                       "Example: python scripts/linkemu.py bench --profile geo --seconds 20")
    _add_link_args(bench, prefix_default="wlbench")
    bench.add_argument("--seconds", type=float, default=20.0, help="length of each TCP transfer (default 20)")
    bench.add_argument("--pings", type=int, default=20, help="echo requests, 0.2 s apart (default 20)")
    bench.add_argument("--directions", default="up,down", help="'up' (box->hub), 'down' or 'up,down'")
    bench.set_defaults(func=cmd_bench)
    profiles = sub.add_parser("profiles", formatter_class=fmt, help="list the built-in profiles",
                              description="List the built-in profiles.\nExample: python scripts/linkemu.py profiles")
    profiles.set_defaults(func=cmd_profiles)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except LinkEmuError as err:
        print(f"linkemu: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
