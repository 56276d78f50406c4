"""Time-ordered prediction ids (UUID version 7, RFC 9562)."""

from __future__ import annotations

import os
import threading
import time
import uuid

_lock = threading.Lock()
_last_ms = 0
_last_counter = 0


def uuid7(now_ns: int | None = None) -> uuid.UUID:
    """A UUIDv7: 48-bit Unix milliseconds, then a 12-bit counter, then 62 random bits.

    Ids from one process are strictly increasing even within one millisecond (the counter
    is seeded randomly each millisecond and incremented, RFC 9562 method 1), so sorting by
    id sorts by creation time.
    """
    global _last_ms, _last_counter
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    with _lock:
        if ms > _last_ms:
            _last_ms = ms
            _last_counter = int.from_bytes(os.urandom(2)) & 0x7FF  # leave headroom to count up
        else:
            ms = _last_ms  # never go backwards, even if the clock does
            _last_counter += 1
            if _last_counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                _last_ms += 1
                ms = _last_ms
                _last_counter = 0
        counter = _last_counter
    return compose_uuid7(ms, counter, int.from_bytes(os.urandom(8)))


def compose_uuid7(ms: int, counter: int, rand: int) -> uuid.UUID:
    """The UUIDv7 with these fields (12-bit counter, 62 random bits); no clock, no state."""
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= (counter & 0xFFF) << 64
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)
    return uuid.UUID(int=value)


def uuid7_time_ms(value: uuid.UUID) -> int:
    """The Unix millisecond timestamp embedded in a UUIDv7."""
    if value.version != 7:
        raise ValueError(f"{value} is not a version 7 UUID")
    return value.int >> 80
