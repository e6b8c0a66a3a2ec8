"""Start slots: jobs before the warm pool, and no refill while any job is starting. No Ray."""

from __future__ import annotations

import asyncio

from bounded import run_bounded

from rayvisor.supervisor.start_slots import REFILL_PATIENCE, StartSlots



def test_the_pool_waits_while_any_job_starts_even_a_warm_one_that_holds_no_slot() -> None:
    async def scenario() -> None:
        slots = StartSlots(lambda: 4)
        with slots.job_starting():  # a warm start: no slot, yet its burst must not be slowed
            refill = asyncio.ensure_future(slots.acquire(job=False))
            await asyncio.sleep(0.01)
            assert not refill.done() and slots.in_use == 0
            await slots.acquire(job=True)  # a cold job still gets a slot at once
            assert slots.in_use == 1
        await refill  # the last start is done: the refill goes
        assert slots.in_use == 2
    run_bounded(scenario)


def test_a_freed_slot_goes_to_a_waiting_job_not_to_the_pool_while_jobs_start() -> None:
    async def scenario() -> None:
        slots = StartSlots(lambda: 1)
        await slots.acquire(job=True)
        refill = asyncio.ensure_future(slots.acquire(job=False))
        with slots.job_starting():
            job = asyncio.ensure_future(slots.acquire(job=True))
            await asyncio.sleep(0)
            slots.release()
            await job
            assert not refill.done()
            slots.release()
            await asyncio.sleep(0.01)
            assert not refill.done(), "a job is still starting"
        await refill
    run_bounded(scenario)


def test_a_refill_waits_until_no_job_has_started_for_the_refill_delay() -> None:
    async def scenario() -> None:
        slots = StartSlots(lambda: 4, refill_delay=lambda: 0.2)
        with slots.job_starting():
            pass  # a job started just now
        ended = asyncio.get_running_loop().time()
        async with slots.for_pool():
            waited = asyncio.get_running_loop().time() - ended
        assert waited >= 0.19, waited
    run_bounded(scenario)


def test_under_a_steady_stream_of_starts_a_refill_still_goes_after_its_patience() -> None:
    async def scenario() -> None:
        slots = StartSlots(lambda: 4, refill_delay=lambda: 0.1)

        under_way = asyncio.Event()

        async def steady_starts() -> None:  # one start every 20 ms: never 0.1 s quiet
            while True:
                with slots.job_starting():
                    under_way.set()
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.01)

        starts = asyncio.ensure_future(steady_starts())
        await under_way.wait()
        began = asyncio.get_running_loop().time()
        async with slots.for_pool():
            waited = asyncio.get_running_loop().time() - began
        starts.cancel()
        assert 0.1 * REFILL_PATIENCE - 0.05 <= waited < 0.1 * REFILL_PATIENCE + 0.5, waited
    run_bounded(scenario)
