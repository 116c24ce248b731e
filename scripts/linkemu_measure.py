"""Measurements across an emulated link (scripts/linkemu_lib.py): ICMP round trips and loss, TCP goodput."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # linkemu_lib imports this module
    from linkemu_lib import LinkEmulator


# ---- measurements -----------------------------------------------------------------------------------------


@dataclass
class PingResult:
    sent: int
    rtts_ms: list[float]

    @property
    def loss_pct(self) -> float:
        return 100.0 * (1 - len(self.rtts_ms) / self.sent) if self.sent else 0.0

    @property
    def avg_ms(self) -> float | None:
        return sum(self.rtts_ms) / len(self.rtts_ms) if self.rtts_ms else None


def ping(link: LinkEmulator, count: int = 10, interval: float = 0.2, side: str = "box",
         wait_s: float = 2.0) -> PingResult:
    """ICMP echo from `side` to the other end; needs iputils ping."""
    target = link.hub_ip if side == "box" else link.box_ip
    # No -w: with a deadline ping keeps sending until it has `count` replies, which hides loss.
    res = link.run_in(side, ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", str(wait_s), target],
                      capture_output=True, text=True, timeout=count * interval + wait_s + 15)
    rtts = [float(m) for m in re.findall(r"time=([\d.]+) ms", res.stdout)]
    return PingResult(sent=count, rtts_ms=rtts)


_SINK = r"""
import json, socket, sys, time
seconds = float(sys.argv[2])
s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(1); s.settimeout(60)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); c.settimeout(1.0)
got, first, end, give_up = 0, None, None, time.monotonic() + 60
while True:
    try:
        b = c.recv(65536)
    except socket.timeout:
        b = None
    now = time.monotonic()
    if first is None and b:
        first, end = now, now + seconds
    elif b:
        got += len(b)
    if b == b"" or (end is not None and now >= end) or (first is None and now > give_up):
        break
print(json.dumps({"bytes": got, "seconds": now - first if first else 0.0}), flush=True)
"""
_SOURCE = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
chunk, stop = b"w" * 65536, time.monotonic() + float(sys.argv[3])
try:
    while time.monotonic() < stop:
        s.sendall(chunk)
except OSError:
    pass
"""


def tcp_goodput(link: LinkEmulator, seconds: float = 10.0, direction: str = "up") -> dict:
    """Bulk TCP from box to hub ('up') or hub to box ('down'); bytes the receiver got in `seconds` after the
    first one, as {'bytes', 'seconds', 'bps'}."""
    from linkemu_lib import LinkEmuError  # at call time: linkemu_lib imports this module
    if direction not in ("up", "down"):
        raise LinkEmuError(f"direction must be 'up' or 'down', not {direction!r}")
    rx, tx = ("hub", "box") if direction == "up" else ("box", "hub")
    rx_ip = link.hub_ip if rx == "hub" else link.box_ip
    sink = link.popen_in(rx, [sys.executable, "-c", _SINK, rx_ip, str(seconds)], stdout=subprocess.PIPE, text=True)
    port = sink.stdout.readline().strip()
    if not port.isdigit():
        raise LinkEmuError(f"TCP sink in {link.ns(rx)} did not start")
    source = link.popen_in(tx, [sys.executable, "-c", _SOURCE, rx_ip, port, str(seconds * 3 + 30)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        line = sink.stdout.readline()
        sink.wait(timeout=10)
    finally:
        if source.poll() is None:
            source.terminate()
        source.wait(timeout=5)
    if not line:
        raise LinkEmuError("TCP sink ended without a result")
    out = json.loads(line)
    out["bps"] = out["bytes"] * 8 / out["seconds"] if out["seconds"] else 0.0
    return out
