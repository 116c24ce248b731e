"""Association slots serve real modalities: junk sockets hold none, the limit is exact, slots free at release."""
from __future__ import annotations

import socket
import time

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from harness import wait_until
from test_scp import echoscu, start_scp, storescu  # noqa: F401 - start_scp is a fixture

pytestmark = pytest.mark.timeout(120)


def _scu() -> AE:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.acse_timeout = 10
    return ae


def _open(port: int, n: int, bind: str = "127.0.0.1") -> list:
    """n associations opened one after another and held open (a modality mid-study)."""
    return [_scu().associate("127.0.0.1", port, ae_title="WASLA", bind_address=(bind, 0)) for _ in range(n)]


def _release(assocs) -> None:
    for a in assocs:
        if a.is_established:
            a.release()


def test_silent_sockets_hold_no_slot_and_a_modality_still_stores(start_scp, make_cfg, sample):
    scp, store = start_scp(make_cfg(dicom={"port": 0, "max_associations": 2, "request_timeout": 2.0}))
    junk = [socket.create_connection(("127.0.0.1", scp.port)) for _ in range(6)]
    try:
        time.sleep(0.5)
        assert echoscu(scp.port).returncode == 0
        out = storescu(scp.port, sample("RG1_UNCR.dcm"))
        assert out.returncode == 0, out.stdout + out.stderr
        # Dropped once their request timeout passed: the peer sees the connection closed.
        for s in junk:
            s.settimeout(10)
            assert s.recv(16) == b""
    finally:
        for s in junk:
            s.close()
    assert store.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 1


def test_max_associations_is_honoured_exactly_and_slots_free_at_release(start_scp, make_cfg):
    scp, _store = start_scp(make_cfg(dicom={"port": 0, "max_associations": 4}))
    held = _open(scp.port, 6)
    try:
        assert [a.is_established for a in held] == [True] * 4 + [False] * 2
        assert all(a.is_rejected for a in held[4:])
    finally:
        _release(held)
    # Freed at release, not when the threads have wound down: four at once again, straight away.
    again = _open(scp.port, 4)
    try:
        assert all(a.is_established for a in again)
    finally:
        _release(again)
    wait_until(lambda: scp.slots.in_use == 0, timeout=10, what="slots given back")
    assert echoscu(scp.port).returncode == 0


def test_one_address_cannot_take_every_slot(start_scp, make_cfg):
    scp, _store = start_scp(make_cfg(dicom={"port": 0, "bind": "0.0.0.0", "max_associations": 3,
                                            "max_associations_per_peer": 2}))
    greedy = _open(scp.port, 3, bind="127.0.0.2")
    try:
        assert [a.is_established for a in greedy] == [True, True, False]
        other = _open(scp.port, 1, bind="127.0.0.3")
        assert other[0].is_established
        _release(other)
    finally:
        _release(greedy)
