from __future__ import annotations

import threading
import time
import uuid

import pytest

from feedback.ids import uuid7, uuid7_time_ms

pytestmark = pytest.mark.unit


def test_version_variant_and_embedded_time() -> None:
    before = time.time_ns() // 1_000_000
    value = uuid7()
    after = time.time_ns() // 1_000_000
    assert value.version == 7
    assert value.variant == uuid.RFC_4122
    assert before <= uuid7_time_ms(value) <= after


def test_ids_strictly_increase_within_one_millisecond() -> None:
    fixed = time.time_ns()
    ids = [uuid7(now_ns=fixed) for _ in range(5000)]  # more than the 12-bit counter holds
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    # String order (what Postgres and clients compare) agrees with integer order.
    assert [str(i) for i in ids] == sorted(str(i) for i in ids)


def test_ids_do_not_go_backwards_when_the_clock_does() -> None:
    now = time.time_ns() + 10_000_000_000  # well past anything issued so far
    later = uuid7(now_ns=now)
    earlier_clock = uuid7(now_ns=now - 5_000_000_000)
    assert earlier_clock > later


def test_ids_from_many_threads_are_unique() -> None:
    out: list[uuid.UUID] = []
    lock = threading.Lock()

    def work() -> None:
        mine = [uuid7() for _ in range(2000)]
        with lock:
            out.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(out)) == 16000


def test_time_of_a_non_v7_uuid_is_refused() -> None:
    with pytest.raises(ValueError, match="not a version 7"):
        uuid7_time_ms(uuid.uuid4())
