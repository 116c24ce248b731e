"""The link emulator: shaping arithmetic without root, then real namespaces, ping and TCP across them as root."""
from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import linkemu  # noqa: E402
import linkemu_lib as le  # noqa: E402

pytestmark = pytest.mark.timeout(90)


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if not shutil.which("ip"):
        return "iproute2 `ip` is not installed"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    probe = f"wlprobe{secrets.token_hex(3)}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"`ip netns add` is not permitted here: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


_WHY_NOT = _netns_unavailable()
needs_netns = pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")
needs_ping = pytest.mark.skipif(not shutil.which("ping"), reason="iputils ping is not installed")


@pytest.fixture
def prefix():
    """A prefix of our own, so tests (and other engineers' runs) never share a namespace."""
    p = f"wl{secrets.token_hex(3)}"
    yield p
    if _WHY_NOT is None:
        assert le.teardown(p) == [], "the emulator left a namespace behind"


# ---- without root -----------------------------------------------------------------------------------------


def test_shaper_serializes_at_the_rate_and_tail_drops_when_the_buffer_is_full():
    sh = le.Shaper(le.DirectionSpec(rate_bps=256_000, delay_ms=300, queue_bytes=4_000), random.Random(1))
    # 1000 B at 256 kbit/s take 31.25 ms on the wire, then 300 ms of flight; each waits for the one before.
    assert [sh.admit(10.0, 1000) for _ in range(4)] == pytest.approx([10.0 + n * 0.03125 + 0.3 for n in (1, 2, 3, 4)])
    assert sh.admit(10.0, 1000) == "queue"  # 4000 B already waiting: the modem buffer is full, tail drop
    assert sh.admit(10.2, 1000) == pytest.approx(10.2 + 0.03125 + 0.3)  # drained meanwhile, accepted again
    assert sh.stats["max_queue_bytes"] == 4000


def test_shaper_loses_the_configured_share_of_packets():
    sh = le.Shaper(le.DirectionSpec(loss_pct=20), random.Random(7))
    lost = sum(sh.admit(0.0, 100) == "loss" for _ in range(10_000))
    assert 1_800 < lost < 2_200


def test_scheduled_cut_is_down_for_the_last_part_of_each_cycle():
    now = [100.0]
    fwd = le.Forwarder(-1, -2, le.resolve_profile("geo-cuts"), clock=lambda: now[0])
    assert [fwd.is_down(100.0 + t) for t in (0, 89.9, 90.0, 119.9, 120.0, 215.0)] == \
        [False, False, True, True, False, True]
    fwd.manual_down = True
    assert fwd.is_down(100.0)


def test_profile_overrides_apply_per_direction_and_bad_values_are_refused():
    p = le.resolve_profile("geo", rate_up_bps=128_000, delay_ms=250, loss_pct=0)
    assert (p.up.rate_bps, p.down.rate_bps, p.up.delay_ms, p.down.loss_pct) == (128_000, 1_024_000, 250, 0)
    assert le.resolve_profile("geo-cuts", cut_every_s=0).cut_every_s == 0
    with pytest.raises(le.LinkEmuError, match="cut_for_s"):
        le.resolve_profile("geo", cut_every_s=10, cut_for_s=20)
    with pytest.raises(le.LinkEmuError, match="loss_pct"):
        le.resolve_profile("geo", loss_pct=120)
    with pytest.raises(le.LinkEmuError, match="unknown profile"):
        le.resolve_profile("dialup")
    with pytest.raises(le.LinkEmuError, match="prefix"):
        le.LinkEmulator("geo", prefix="no/slash")


def test_rates_parse_with_unit_suffixes():
    assert [linkemu.parse_rate(t) for t in ("256k", "1M", "5Mbit", "256000", "0")] == \
        [256_000, 1_000_000, 5_000_000, 256_000, 0]


def test_every_cli_command_has_help_with_an_example():
    parser = linkemu.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    assert set(subs.choices) == {"up", "down", "run", "bench", "profiles"}
    for name, sub in subs.choices.items():
        assert "Example: python scripts/linkemu.py " + name in sub.format_help(), name


# ---- as root, in real namespaces --------------------------------------------------------------------------


@needs_netns
@needs_ping
def test_ping_rtt_is_twice_the_one_way_delay(prefix):
    with le.LinkEmulator("starlink", prefix=prefix, delay_ms=100, loss_pct=0) as link:
        pr = le.ping(link, count=6, interval=0.2)
        st = link.stats()
    assert len(pr.rtts_ms) == 6
    assert 170 <= pr.avg_ms <= 230, pr.rtts_ms
    assert st["up"]["packets_out"] >= 6 and st["down"]["packets_out"] >= 6


@needs_netns
def test_tcp_goodput_over_a_256kbit_uplink_is_80_to_100_percent_of_the_rate(prefix):
    with le.LinkEmulator("geo", prefix=prefix, delay_ms=100, loss_pct=0) as link:
        g = le.tcp_goodput(link, seconds=6, direction="up")
        st = link.stats()["up"]
    assert 0.80 * 256_000 <= g["bps"] <= 256_000, g
    assert st["bytes_out"] > 0.8 * 256_000 / 8 * 6


@needs_netns
@needs_ping
def test_ping_loss_with_20_percent_each_way_is_about_36_percent_round_trip(prefix):
    with le.LinkEmulator("clean", prefix=prefix, loss_pct=20, seed=11) as link:
        pr = le.ping(link, count=200, interval=0.01, wait_s=1)
        st = link.stats()
    assert 25 <= pr.loss_pct <= 48, pr.loss_pct  # 1 - 0.8 ** 2 = 36 %
    assert st["up"]["drop_loss"] > 0 and st["down"]["drop_loss"] > 0


@needs_netns
@needs_ping
def test_manual_cut_drops_everything_then_the_link_recovers(prefix):
    with le.LinkEmulator("starlink", prefix=prefix, loss_pct=0) as link:
        assert len(le.ping(link, count=2, interval=0.2).rtts_ms) == 2
        link.set_down(True)
        assert le.ping(link, count=3, interval=0.2, wait_s=1).rtts_ms == []
        assert link.stats()["up"]["drop_cut"] >= 3 and link.stats()["up"]["down_now"]
        link.set_down(False)
        assert len(le.ping(link, count=3, interval=0.2).rtts_ms) == 3


@needs_netns
@needs_ping
def test_scheduled_cut_drops_traffic_for_its_length_then_recovers(prefix):
    with le.LinkEmulator("clean", prefix=prefix, cut_every_s=2, cut_for_s=1) as link:
        res = link.run_in("box", ["ping", "-n", "-c", "60", "-i", "0.05", "-W", "1", link.hub_ip],
                          capture_output=True, text=True, timeout=20)
        st = link.stats()
    seqs = sorted(int(s) for s in re.findall(r"icmp_seq=(\d+)", res.stdout))
    gaps = [b - a for a, b in zip(seqs, seqs[1:])]
    assert 15 <= len(seqs) <= 45, seqs  # 3 s of pings over up 1 s / down 1 s cycles
    assert max(gaps) >= 14, seqs  # about 1 s (20 pings) lost in one stretch, then replies again
    assert st["up"]["drop_cut"] >= 10


@needs_netns
def test_cleanup_leaves_no_namespace_even_when_the_body_raises(prefix):
    with pytest.raises(RuntimeError):
        with le.LinkEmulator("geo", prefix=prefix) as link:
            assert {link.box_ns, link.hub_ns} <= set(le.list_netns())
            sleeper = link.popen_in("hub", ["sleep", "60"])
            raise RuntimeError("boom")
    assert sleeper.poll() is not None, "a process started in the namespace outlived the link"
    assert not [ns for ns in le.list_netns() if ns.startswith(prefix)]
    assert link.stats()["up"]["packets_in"] == 0  # the final counts stay readable after teardown
    with pytest.raises(le.LinkEmuError, match="not started"):
        le.LinkEmulator("geo", prefix=prefix).set_down(True)
    le.LinkEmulator("geo", prefix=prefix).stop()  # stopping again, or something never started, is harmless


@needs_netns
def test_a_second_link_on_a_taken_prefix_is_refused_and_leaves_the_first_alone(prefix):
    with le.LinkEmulator("clean", prefix=prefix) as first:
        second = le.LinkEmulator("geo", prefix=prefix)
        with pytest.raises(le.LinkEmuError, match="already exists"):
            second.start()
        second.stop()
        assert {first.box_ns, first.hub_ns} <= set(le.list_netns())


@needs_netns
@needs_ping
def test_up_runs_until_down_then_removes_its_namespaces(prefix):
    up = subprocess.Popen([sys.executable, str(SCRIPTS / "linkemu.py"), "up", "--profile", "starlink",
                           "--prefix", prefix, "--loss", "0"], stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or not lines[-1].startswith("ready:"):
            line = up.stdout.readline()
            assert line, f"up exited before ready: {lines}"
            lines.append(line)
        assert any(f"{prefix}-hub 10.77.0.2/30" in ln for ln in lines)
        ok = subprocess.run(["ip", "netns", "exec", f"{prefix}-box", "ping", "-n", "-c", "2", "-i", "0.2",
                             "10.77.0.2"], capture_output=True, text=True, timeout=10)
        assert ok.returncode == 0, ok.stdout
        # A second `up` on the same prefix is refused, not merged into the first.
        again = subprocess.run([sys.executable, str(SCRIPTS / "linkemu.py"), "up", "--prefix", prefix],
                               capture_output=True, text=True, timeout=20)
        assert again.returncode == le.LinkEmuError.exit_code and "already exists" in again.stderr
        down = subprocess.run([sys.executable, str(SCRIPTS / "linkemu.py"), "down", "--prefix", prefix],
                              capture_output=True, text=True, timeout=20)
        assert down.returncode == 0, down.stderr
        assert up.wait(timeout=10) == 0
        stats = json.loads(next(ln for ln in up.stdout.read().splitlines() if ln.startswith("stats: "))[7:])
        assert stats["up"]["packets_out"] >= 2
    finally:
        if up.poll() is None:
            up.terminate()
            up.wait(timeout=10)
    assert not [ns for ns in le.list_netns() if ns.startswith(prefix)]
