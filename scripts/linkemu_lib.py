"""Userspace link emulator: two network namespaces joined by TUN devices through a delay/loss/rate/cut forwarder.

The kernel here has no netem qdisc, so one process owns a TUN device in `<prefix>-box` and one in `<prefix>-hub`
and moves IP packets between them itself. Everything it writes goes into one of those two namespaces; neither
has a route to anything else, so nothing it emulates can reach the host or the outside world.
"""
from __future__ import annotations

import atexit
import ctypes
import fcntl
import heapq
import itertools
import logging
import os
import random
import re
import select
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sync.core.errors import WaslaError  # noqa: E402

log = logging.getLogger(__name__)

BOX_IP, HUB_IP, PREFIX_LEN = "10.77.0.1", "10.77.0.2", 30
TUN_NAME = "emu0"
SIDES = ("box", "hub")
_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
_MAX_PACKET = 65535
_READ_BURST = 64  # packets read from one TUN per wake-up, so one busy direction cannot starve the other
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_]{1,12}$")


class LinkEmuError(WaslaError):
    """The emulated link cannot be set up, used or torn down; the message says what and how to fix it."""

    exit_code = 8


@dataclass(frozen=True)
class DirectionSpec:
    """How one direction of the link behaves.

    rate_bps: serialization rate in bit/s of IP bytes, 0 = unlimited (default 0; 1,000 .. 10,000,000,000).
    delay_ms: one-way propagation delay added after serialization (default 0; 0 .. 10,000).
    loss_pct: chance in percent that a packet is lost on the air, independently per packet (default 0; 0 .. 100).
    queue_bytes: modem buffer in front of the serializer; a packet that does not fit is tail-dropped
        (default 100,000 — about 3 s at 256 kbit/s, like a VSAT modem; 1,500 .. 100,000,000).
    """

    rate_bps: float = 0
    delay_ms: float = 0
    loss_pct: float = 0
    queue_bytes: int = 100_000

    def validate(self, name: str) -> None:
        checks = [
            ("rate_bps", self.rate_bps == 0 or 1_000 <= self.rate_bps <= 10e9, "0 or 1,000 .. 10e9"),
            ("delay_ms", 0 <= self.delay_ms <= 10_000, "0 .. 10,000"),
            ("loss_pct", 0 <= self.loss_pct <= 100, "0 .. 100"),
            ("queue_bytes", 1_500 <= self.queue_bytes <= 100_000_000, "1,500 .. 100,000,000"),
        ]
        for key, ok, allowed in checks:
            if not ok:
                raise LinkEmuError(f"{name}.{key} = {getattr(self, key)!r} is out of range ({allowed})")


@dataclass(frozen=True)
class LinkProfile:
    """A whole link. `up` is box -> hub, `down` is hub -> box.

    cut_every_s / cut_for_s: scheduled outages; the link is up for (every - for) seconds from the start, then
        down for `for` seconds, repeating. Both 0 (the default) means no scheduled cut; 0 < for < every.
    """

    up: DirectionSpec = field(default_factory=DirectionSpec)
    down: DirectionSpec = field(default_factory=DirectionSpec)
    cut_every_s: float = 0
    cut_for_s: float = 0

    def validate(self) -> LinkProfile:
        self.up.validate("up")
        self.down.validate("down")
        if (self.cut_every_s, self.cut_for_s) != (0, 0) and not 0 < self.cut_for_s < self.cut_every_s:
            raise LinkEmuError(f"cut_for_s ({self.cut_for_s}) must be > 0 and < cut_every_s ({self.cut_every_s})")
        return self

    def describe(self) -> str:
        def one(d: DirectionSpec) -> str:
            rate = f"{d.rate_bps / 1000:g} kbit/s" if d.rate_bps else "unlimited"
            return f"{rate}, {d.delay_ms:g} ms, {d.loss_pct:g} % loss, queue {d.queue_bytes} B"

        cuts = f"; cut {self.cut_for_s:g} s every {self.cut_every_s:g} s" if self.cut_every_s else ""
        return f"up(box->hub) {one(self.up)}; down(hub->box) {one(self.down)}{cuts}"


_GEO = LinkProfile(
    # VSAT is asymmetric: the clinic's uplink is the scarce side (ANCHORS: 128 kbit/s - 1 Mbit/s).
    up=DirectionSpec(rate_bps=256_000, delay_ms=300, loss_pct=1),
    down=DirectionSpec(rate_bps=1_024_000, delay_ms=300, loss_pct=1),
)
_LEO = LinkProfile(
    up=DirectionSpec(rate_bps=5_000_000, delay_ms=20, loss_pct=0.5, queue_bytes=250_000),
    down=DirectionSpec(rate_bps=20_000_000, delay_ms=20, loss_pct=0.5, queue_bytes=1_000_000),
)

PROFILES: dict[str, LinkProfile] = {
    "geo": _GEO,
    "geo-cuts": replace(_GEO, cut_every_s=120, cut_for_s=30),
    "starlink": LinkProfile(
        up=DirectionSpec(rate_bps=5_000_000, delay_ms=20, loss_pct=1),
        down=DirectionSpec(rate_bps=5_000_000, delay_ms=20, loss_pct=1),
    ),
    # A LEO terminal (the independent emulator): 5 Mbit/s, 40 ms round trip. Handovers between satellites
    # every ~15 s drop the link for a fraction of a second (a stall, not a disconnect: MQTT keepalive rides it out).
    "leo": _LEO,
    "leo-handovers": replace(_LEO, cut_every_s=15, cut_for_s=0.4),
    "clean": LinkProfile(),
}


def resolve_profile(profile: str | LinkProfile = "geo", *, rate_bps: float | None = None,
                    rate_up_bps: float | None = None, rate_down_bps: float | None = None,
                    delay_ms: float | None = None, loss_pct: float | None = None, queue_bytes: int | None = None,
                    cut_every_s: float | None = None, cut_for_s: float | None = None) -> LinkProfile:
    """A named profile (or a LinkProfile) with overrides applied to both directions unless named per direction."""
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise LinkEmuError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
        profile = PROFILES[profile]
    both = {k: v for k, v in dict(rate_bps=rate_bps, delay_ms=delay_ms, loss_pct=loss_pct,
                                    queue_bytes=queue_bytes).items() if v is not None}
    up, down = replace(profile.up, **both), replace(profile.down, **both)
    if rate_up_bps is not None:
        up = replace(up, rate_bps=rate_up_bps)
    if rate_down_bps is not None:
        down = replace(down, rate_bps=rate_down_bps)
    cuts = {k: v for k, v in dict(cut_every_s=cut_every_s, cut_for_s=cut_for_s).items() if v is not None}
    if cut_every_s == 0 or cut_for_s == 0:
        cuts = dict(cut_every_s=0, cut_for_s=0)
    return replace(profile, up=up, down=down, **cuts).validate()


class Shaper:
    """One direction's modem: a bounded FIFO in front of a fixed-rate serializer, then loss and delay.

    The queue is not stored: its backlog is how long the serializer is still busy times the rate.
    """

    def __init__(self, spec: DirectionSpec, rng: random.Random):
        self.spec, self.rng = spec, rng
        self.busy_until = 0.0
        self.stats = dict(packets_in=0, bytes_in=0, packets_out=0, bytes_out=0, drop_loss=0, drop_queue=0,
                          drop_cut=0, drop_error=0, max_queue_bytes=0)

    def admit(self, now: float, size: int) -> float | str:
        """When a packet of `size` bytes arriving at `now` reaches the far end, or why it is dropped."""
        sent = now
        if self.spec.rate_bps:
            start = max(now, self.busy_until)
            backlog = (start - now) * self.spec.rate_bps / 8
            if backlog + size > self.spec.queue_bytes:
                return "queue"
            self.stats["max_queue_bytes"] = max(self.stats["max_queue_bytes"], int(backlog + size))
            self.busy_until = sent = start + size * 8 / self.spec.rate_bps
        # Lost on the air: the packet has used its share of the link before it is lost.
        if self.spec.loss_pct and self.rng.random() * 100 < self.spec.loss_pct:
            return "loss"
        return sent + self.spec.delay_ms / 1000


class Forwarder:
    """The single-threaded epoll loop moving packets between the two TUN fds, with a timer heap for delivery."""

    def __init__(self, box_fd: int, hub_fd: int, profile: LinkProfile, seed: int | None = None,
                 clock=time.monotonic):
        rng = random.Random(seed)
        self.shapers = {"up": Shaper(profile.up, rng), "down": Shaper(profile.down, rng)}
        self.routes = {box_fd: ("up", hub_fd), hub_fd: ("down", box_fd)}
        self.profile, self.clock = profile, clock
        self.manual_down = False
        self._heap: list[tuple[float, int, str, int, bytes]] = []
        self._seq = itertools.count()
        self._stopping = False
        self._wake_w: int | None = None
        self._wake_lock = threading.RLock()  # re-entrant: stop() may run as a signal handler inside run()
        self.t0 = clock()

    def is_down(self, at: float) -> bool:
        every, cut = self.profile.cut_every_s, self.profile.cut_for_s
        return self.manual_down or bool(every and (at - self.t0) % every >= every - cut)

    def stop(self) -> None:
        """Ask the loop to return; safe from another thread or a signal handler."""
        self._stopping = True
        with self._wake_lock:
            if self._wake_w is not None:
                try:
                    os.write(self._wake_w, b"x")
                except OSError:
                    pass

    def stats(self) -> dict:
        return {name: dict(s.stats, down_now=self.is_down(self.clock())) for name, s in self.shapers.items()}

    def run(self) -> None:
        """Forward until stop(); the loop wakes on either TUN, on stop(), or when the next packet is due."""
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        ep = select.epoll()
        try:
            for fd in (*self.routes, self._wake_r):
                ep.register(fd, select.EPOLLIN)
            while not self._stopping:
                timeout = max(0.0, self._heap[0][0] - self.clock()) if self._heap else 1.0
                for fd, _ev in ep.poll(timeout):
                    if fd == self._wake_r:
                        self._drain_wake()
                    else:
                        self._read(fd, self.clock())
                self._deliver(self.clock())
        finally:
            ep.close()
            with self._wake_lock:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_w = None

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _read(self, fd: int, now: float) -> None:
        name, out_fd = self.routes[fd]
        shaper = self.shapers[name]
        st = shaper.stats
        for _ in range(_READ_BURST):
            try:
                pkt = os.read(fd, _MAX_PACKET)
            except BlockingIOError:
                return
            except OSError as err:  # e.g. EIO while the device is being torn down
                log.warning("read from the %s TUN failed: %s", name, err)
                return
            st["packets_in"] += 1
            st["bytes_in"] += len(pkt)
            if self.is_down(now):
                st["drop_cut"] += 1
                continue
            due = shaper.admit(now, len(pkt))
            if isinstance(due, str):
                st["drop_" + due] += 1
                continue
            heapq.heappush(self._heap, (due, next(self._seq), name, out_fd, pkt))

    def _deliver(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now + 0.0005:  # epoll wakes on whole milliseconds
            due, _seq, name, out_fd, pkt = heapq.heappop(heap)
            st = self.shapers[name].stats
            if self.is_down(due):  # a cut also loses what was already in flight
                st["drop_cut"] += 1
                continue
            try:
                os.write(out_fd, pkt)
            except OSError as err:
                st["drop_error"] += 1
                log.debug("write to %s failed: %s", name, err)
                continue
            st["packets_out"] += 1
            st["bytes_out"] += len(pkt)


# ---- namespaces -------------------------------------------------------------------------------------------


def _ip(*args: str, stdin: str | None = None) -> str:
    try:
        res = subprocess.run(["ip", *args], input=stdin, capture_output=True, text=True, timeout=20)
    except FileNotFoundError as err:
        raise LinkEmuError("the `ip` command (iproute2) is not installed") from err
    if res.returncode != 0:
        raise LinkEmuError(f"`ip {' '.join(args)}` failed: {res.stderr.strip() or res.returncode}")
    return res.stdout


def list_netns() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def ns_names(prefix: str) -> dict[str, str]:
    if not _PREFIX_RE.match(prefix):
        raise LinkEmuError(f"prefix {prefix!r} must be 1-12 letters, digits or _")
    return {side: f"{prefix}-{side}" for side in SIDES}


def _open_tun_in(ns: str) -> int:
    """A non-persistent TUN fd created inside `ns`; the device dies with the fd, so a crash leaves none behind.

    setns() applies to the calling thread only, so a throwaway thread enters the namespace, opens the device
    there and hands back the fd, which stays bound to that namespace.
    """
    out: dict = {}

    def work() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            nsfd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(nsfd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
            finally:
                os.close(nsfd)
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", TUN_NAME.encode(), _IFF_TUN | _IFF_NO_PI))
            out["fd"] = fd
            try:  # IPv6 autoconf chatter would only add noise to the counters
                Path(f"/proc/sys/net/ipv6/conf/{TUN_NAME}/disable_ipv6").write_text("1")
            except OSError:
                pass
        except OSError as err:
            out["err"] = err

    t = threading.Thread(target=work, name=f"tun-{ns}")
    t.start()
    t.join()
    if "err" in out:
        raise LinkEmuError(f"cannot create a TUN device in {ns}: {out['err']}") from out["err"]
    return out["fd"]


def _delete_netns(names: list[str]) -> list[str]:
    existing = set(list_netns()) if names else set()
    removed = []
    for ns in names:
        if ns in existing:
            pids = _ip("netns", "pids", ns).split()
            if pids:
                log.warning("processes still inside %s (not ours to end): %s", ns, " ".join(pids))
            _ip("netns", "del", ns)
            removed.append(ns)
    return removed


def teardown(prefix: str) -> list[str]:
    """Delete the prefix's namespaces if they exist; returns the ones deleted. Idempotent."""
    return _delete_netns(list(ns_names(prefix).values()))


class LinkEmulator:
    """Two namespaces `<prefix>-box` (10.77.0.1) and `<prefix>-hub` (10.77.0.2) joined by an emulated link.

    with LinkEmulator("geo", prefix="wl1", loss_pct=0) as link:
        link.run_in("box", ["ping", "-c", "3", link.hub_ip])
    """

    def __init__(self, profile: str | LinkProfile = "geo", prefix: str = "wl1", seed: int | None = None,
                 **overrides):
        self.profile = resolve_profile(profile, **overrides)
        self.profile_name = profile if isinstance(profile, str) else "custom"
        self.prefix, self.seed = prefix, seed
        names = ns_names(prefix)
        self.box_ns, self.hub_ns = names["box"], names["hub"]
        self.box_ip, self.hub_ip = BOX_IP, HUB_IP
        self.forwarder: Forwarder | None = None
        self._fds: list[int] = []
        self._thread: threading.Thread | None = None
        self._procs: list[subprocess.Popen] = []
        self._created: list[str] = []  # only these are ever deleted: never another run's namespaces

    def __enter__(self) -> LinkEmulator:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def ns(self, side: str) -> str:
        if side not in SIDES:
            raise LinkEmuError(f"side must be 'box' or 'hub', not {side!r}")
        return self.box_ns if side == "box" else self.hub_ns

    def start(self, threaded: bool = True) -> None:
        """Create namespaces and TUN devices; start the forwarder in a thread unless `threaded` is False
        (then the caller runs `self.forwarder.run()` itself, as the `up` command does)."""
        if os.geteuid() != 0:
            raise LinkEmuError("creating network namespaces needs root")
        clash = [ns for ns in (self.box_ns, self.hub_ns) if ns in list_netns()]
        if clash:
            raise LinkEmuError(f"namespace {clash[0]} already exists; run `linkemu.py down --prefix {self.prefix}`")
        atexit.register(self.stop)
        try:
            for side, ip in (("box", BOX_IP), ("hub", HUB_IP)):
                ns = self.ns(side)
                _ip("netns", "add", ns)
                self._created.append(ns)
                self._fds.append(_open_tun_in(ns))
                _ip("-n", ns, "-batch", "-", stdin=f"link set lo up\naddr add {ip}/{PREFIX_LEN} dev {TUN_NAME}\n"
                                                   f"link set {TUN_NAME} up\n")
            self.forwarder = Forwarder(self._fds[0], self._fds[1], self.profile, seed=self.seed)
        except BaseException:
            self.stop()
            raise
        if threaded:
            self._thread = threading.Thread(target=self._run_logged, name=f"linkemu-{self.prefix}", daemon=True)
            self._thread.start()
        log.info("link %s up: %s", self.prefix, self.profile.describe())

    def _run_logged(self) -> None:
        try:
            self._fwd().run()
        except Exception:
            log.exception("forwarder of link %s died; the link carries nothing now", self.prefix)

    def stop(self) -> None:
        """End the processes started through this object, stop the forwarder, delete both namespaces."""
        atexit.unregister(self.stop)
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        for p in self._procs:
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._procs.clear()
        if self.forwarder is not None:
            self.forwarder.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        removed = _delete_netns(self._created)
        if removed:
            log.info("link %s down, %s removed", self.prefix, " ".join(removed))
        self._created.clear()

    def set_down(self, down: bool = True) -> None:
        """Cut the link by hand (True) or restore it (False); scheduled cuts still apply on top."""
        self._fwd().manual_down = bool(down)

    def stats(self) -> dict:
        """Per direction ('up' box->hub, 'down' hub->box): packets/bytes in and out, drops by reason."""
        return self._fwd().stats()

    def _fwd(self) -> Forwarder:
        if self.forwarder is None:
            raise LinkEmuError("the link is not started")
        return self.forwarder

    def command(self, side: str, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(side), *cmd]

    def popen_in(self, side: str, cmd: list[str], **kwargs) -> subprocess.Popen:
        """Start `cmd` inside a namespace; it is ended (SIGTERM, then SIGKILL) when the link stops."""
        p = subprocess.Popen(self.command(side, cmd), **kwargs)
        self._procs.append(p)
        return p

    def run_in(self, side: str, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        """subprocess.run of `cmd` inside a namespace; kwargs go to subprocess.run."""
        return subprocess.run(self.command(side, cmd), **kwargs)


# ---- measurements (linkemu_measure.py), re-exported so `le.ping(...)` keeps working -------------------------------
from linkemu_measure import PingResult, ping, tcp_goodput  # noqa: E402,F401
