"""The box's send order as a pure decision at a given time: flags first, a study's images after its flag, resume
waits, lost-ack queries, the budget and the in-flight window (edge/uplink/scheduler.py)."""
from edge.uplink.outbox import CONFIRMED, FLAG
from edge.uplink.scheduler import LinkState, pick

TIMEOUT = 120.0


def state(**kw) -> LinkState:
    base = dict(conn_no=1, flag_sent={}, queried={}, manifest_conn={}, resume_wait={}, ack_timeout=TIMEOUT)
    return LinkState(**{**base, **kw})


def flag(fid: str, study: str) -> dict:
    return {"kind": FLAG, "flag_id": fid, "study_uid": study}


def transfer(tid: str, study: str, *, label: str = "normal", confirmed: bool = False, count: int = 4) -> dict:
    return {"kind": "study", "transfer_id": tid, "study_uid": study, "label": label,
            "state": CONFIRMED if confirmed else "queued", "chunk_size": 100, "size": 100 * count, "attempts": 0}


def decide(rows, now=1000.0, st=None, *, index=0, allow=(True, ""), full=False, wait=0.0):
    return pick(rows, now, st or state(), next_index=lambda _r: index, allow_bulk=lambda _u: allow,
                window_full=lambda _n: full, pace=lambda _n: wait)


def test_an_unsent_flag_goes_before_any_study_bytes():
    # the outbox lists flags first (edge/uplink/outbox.py); even a transfer whose manifest already went waits
    choice = decide([flag("f2", "s2"), transfer("t1", "s1")], st=state(manifest_conn={"t1": 1}))
    assert (choice.action, choice.row["flag_id"]) == ("flag", "f2")


def test_a_study_waits_while_its_flag_is_unconfirmed_and_others_go_meanwhile():
    rows = [flag("f1", "s1"), transfer("t1", "s1"), transfer("t2", "s2")]
    st = state(flag_sent={"f1": 990.0}, manifest_conn={"t1": 1, "t2": 1})
    choice = decide(rows, 1000.0, st)
    assert (choice.action, choice.row["transfer_id"]) == ("chunk", "t2")


def test_an_unanswered_flag_is_sent_again_after_the_ack_timeout():
    st = state(flag_sent={"f1": 1000.0})
    assert decide([flag("f1", "s1")], 1000.0 + TIMEOUT - 1, st).action == "idle"
    assert decide([flag("f1", "s1")], 1000.0 + TIMEOUT + 1, st).action == "flag"


def test_a_new_connection_sends_the_manifest_before_any_chunk():
    rows = [transfer("t1", "s1")]
    assert decide(rows, st=state(conn_no=2, manifest_conn={"t1": 1})).action == "manifest"
    assert decide(rows, st=state(conn_no=2, manifest_conn={"t1": 2})).action == "chunk"


def test_a_resumed_transfer_waits_for_the_hub_s_answer_until_its_deadline():
    rows = [transfer("t1", "s1")]
    st = state(manifest_conn={"t1": 1}, resume_wait={"t1": 1005.0})
    assert decide(rows, 1000.0, st).action == "idle"
    late = decide(rows, 1006.0, st)
    assert late.action == "chunk" and late.resumed == ["t1"]


def test_a_confirmed_transfer_is_queried_only_when_its_final_ack_seems_lost():
    rows = [transfer("t1", "s1", confirmed=True)]
    assert decide(rows, 1000.0, state(queried={"t1": 990.0})).action == "idle"
    assert decide(rows, 1000.0 + TIMEOUT, state(queried={"t1": 990.0})).action == "query"


def test_the_budget_holds_back_bulk_and_says_why():
    rows = [transfer("t1", "s1"), flag("f2", "s2")]
    choice = decide(rows, st=state(manifest_conn={"t1": 1}), allow=(False, "outside bulk_windows"))
    assert choice.action == "flag" and choice.blocked == "outside bulk_windows"


def test_a_full_window_stops_lower_rows_overtaking_and_pacing_waits():
    rows = [transfer("t1", "s1", label="urgent"), transfer("t2", "s2")]
    st = state(manifest_conn={"t1": 1, "t2": 1})
    full = decide(rows, st=st, full=True)
    assert (full.action, full.row["transfer_id"]) == ("full", "t1")
    paced = decide(rows, st=st, wait=0.8)
    assert paced.action == "pace" and paced.wait == 0.8


def test_a_transfer_with_every_chunk_in_flight_lets_the_next_one_go():
    rows = [transfer("t1", "s1"), transfer("t2", "s2")]
    st = state(manifest_conn={"t1": 1, "t2": 1})
    choice = pick(rows, 1000.0, st, next_index=lambda r: None if r["transfer_id"] == "t1" else 3,
                  allow_bulk=lambda _u: (True, ""), window_full=lambda _n: False, pace=lambda _n: 0.0)
    assert (choice.action, choice.row["transfer_id"], choice.index) == ("chunk", "t2", 3)
