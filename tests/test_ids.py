"""Decision ids: UUIDv7 strings, time-sortable, unique."""

from __future__ import annotations

import os
import re
import time
import uuid

from policyd.core.ids import ID_LENGTH, id_time_ms, new_id, new_request_id


def test_ids_are_uuid7_with_the_rfc_9562_variant() -> None:
    for _ in range(2000):  # every variant nibble (8, 9, a, b) shows up
        decision_id = new_id()
        parsed = uuid.UUID(decision_id)
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == decision_id
        assert len(decision_id) == ID_LENGTH  # the gRPC door encodes its length once


def test_the_time_inside_an_id_is_when_it_was_made() -> None:
    before = time.time_ns() // 1_000_000
    decision_id = new_id()
    after = time.time_ns() // 1_000_000
    assert before <= id_time_ms(decision_id) <= after
    assert id_time_ms(new_id(1_700_000_000_123)) == 1_700_000_000_123


def test_ids_of_a_later_millisecond_sort_after_earlier_ones() -> None:
    earlier = [new_id(1_700_000_000_000) for _ in range(100)]
    later = [new_id(1_700_000_000_001) for _ in range(100)]
    assert max(earlier) < min(later)
    first = new_id()
    time.sleep(0.002)
    assert new_id() > first


def test_ids_do_not_repeat() -> None:
    assert len({new_id() for _ in range(100_000)}) == 100_000


def test_request_ids_are_32_hex_digits_and_do_not_repeat() -> None:
    made = {new_request_id() for _ in range(100_000)}
    assert len(made) == 100_000
    assert all(re.fullmatch(r"[0-9a-f]{32}", request_id) for request_id in made)


def test_a_forked_child_makes_ids_of_its_own() -> None:
    # The module RNG is re-seeded in a forked child (random's at-fork hook): a child's ids
    # are not its parent's next ones.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.write(write, f"{new_id()} {new_request_id()}".encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        child_id, child_request_id = pipe.read().split()
    assert child_id[15:] != new_id()[15:]
    assert child_request_id != new_request_id()
