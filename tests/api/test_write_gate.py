"""The write gate on its own: handed over in arrival order, never lost to cancellation, no self-deadlock."""

from __future__ import annotations

import asyncio

import pytest

from api.db.write_gate import WriteDeadlock, WriteGate, gate_for


async def _queued(gate: WriteGate, count: int) -> None:
    """Let the event loop run until ``count`` acquirers have queued (a hang guard, not a timing assert)."""
    async with asyncio.timeout(10):
        while gate.queued < count:
            await asyncio.sleep(0)


async def test_waiters_are_handed_the_gate_in_arrival_order_and_newcomers_queue_behind_them() -> None:
    gate = WriteGate(asyncio.get_running_loop())
    assert gate.try_acquire("a")
    order: list[str] = []

    async def writer(name: str) -> None:
        await gate.acquire(name, timeout_s=10)
        order.append(name)
        gate.release(name)

    waiting = [asyncio.create_task(writer(name)) for name in ("b", "c", "d")]
    await _queued(gate, 3)
    assert not gate.try_acquire("e")  # no barging past the queue
    assert gate.release("a")
    # Handed over, not merely freed: "b" holds it before it has even run.
    assert gate.holder == "b"
    await asyncio.gather(*waiting)
    assert order == ["b", "c", "d"]
    assert gate.holder is None and gate.acquired == 4


async def test_a_cancelled_waiter_is_skipped_and_one_cancelled_after_its_turn_passes_it_on() -> None:
    gate = WriteGate(asyncio.get_running_loop())
    gate.try_acquire("a")
    b = asyncio.create_task(gate.acquire("b", timeout_s=10))
    c = asyncio.create_task(gate.acquire("c", timeout_s=10))
    d = asyncio.create_task(gate.acquire("d", timeout_s=10))
    await _queued(gate, 3)
    b.cancel()
    await asyncio.sleep(0)
    gate.release("a")
    assert gate.holder == "c"
    c.cancel()  # handed the gate, but cancelled before it could run: it must pass the gate on
    results = await asyncio.gather(b, c, d, return_exceptions=True)
    assert [type(r) for r in results] == [asyncio.CancelledError, asyncio.CancelledError, type(None)]
    assert gate.holder == "d"
    gate.release("d")
    assert gate.holder is None


async def test_a_wait_that_times_out_leaves_the_queue() -> None:
    gate = WriteGate(asyncio.get_running_loop())
    gate.try_acquire("a")
    with pytest.raises(TimeoutError):
        await asyncio.create_task(gate.acquire("b", timeout_s=0.01))  # another task: not a self-deadlock
    gate.release("a")
    assert gate.holder is None and gate.try_acquire("c")


async def test_a_task_asking_again_through_another_connection_fails_instead_of_waiting_for_itself() -> None:
    gate = WriteGate(asyncio.get_running_loop())
    gate.try_acquire("first connection")
    with pytest.raises(WriteDeadlock):
        await gate.acquire("second connection", timeout_s=10)
    assert gate.try_acquire("first connection")  # the holder asking again is not a second writer
    assert gate.release("first connection")
    assert not gate.release("first connection")


async def test_gates_are_per_database_file() -> None:
    assert gate_for("/data/a.db") is gate_for("/data/a.db")
    assert gate_for("/data/a.db") is not gate_for("/data/b.db")
