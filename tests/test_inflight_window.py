"""The uploader's in-flight window: bulk bytes capped until the broker's PUBACK, early PUBACKs, a new connection."""
from __future__ import annotations

from edge.uplink.window import InflightWindow


def test_bulk_bytes_count_until_acked_and_an_empty_window_always_takes_one_chunk():
    w = InflightWindow()
    assert not w.would_exceed(10_000_000, cap=8192)  # empty: even an oversized chunk goes
    w.published(1, 4096)
    w.published(2, 0)  # a flag or heartbeat: tracked, no bulk bytes
    assert w.bytes == 4096 and w.would_exceed(8192, cap=8192) and not w.would_exceed(4096, cap=8192)
    size, age = w.acked(1)
    assert size == 4096 and age >= 0 and w.bytes == 0
    assert w.acked(2)[0] == 0


def test_a_puback_faster_than_paho_s_return_is_not_counted_against_a_later_chunk_with_the_same_id():
    w = InflightWindow()
    assert w.acked(7) is None  # the broker answered before publish() returned mid 7
    w.published(7, 4096)  # ... which is then already done
    assert w.bytes == 0
    w.published(7, 4096)  # paho reuses id 7 for a later chunk: that one counts
    assert w.bytes == 4096


def test_a_new_connection_forgets_what_was_in_flight():
    w = InflightWindow()
    w.published(1, 4096)
    w.acked(9)
    w.clear()
    assert w.bytes == 0 and w.acked(1) is None
    w.published(9, 100)  # the early ack from before the cut no longer exempts anything
    assert w.bytes == 100
