"""AsyncEngine against the fake engine: threading, cancellation, slow consumers, errors."""
from __future__ import annotations

import asyncio

import pytest
from srv_fake_engine import FakeEngine

from miniinfer.sampling_params import SamplingParams
from miniinfer.server.async_engine import (
    AsyncEngine, ChatPrompt, EngineCrashedError, EngineDeadError, InvalidPromptError, RequestFailedError,
    RequestTimeoutError,
)


async def _started(**kw) -> tuple[AsyncEngine, FakeEngine]:
    holder = {}

    def factory():
        holder["e"] = FakeEngine(**kw)
        return holder["e"]

    eng = AsyncEngine(factory)
    eng.start()
    for _ in range(500):
        if eng.ready:
            break
        await asyncio.sleep(0.01)
    assert eng.ready
    return eng, holder["e"]


async def _wait_idle(eng: AsyncEngine, cond=lambda: True) -> None:
    for _ in range(300):
        s = eng.stats()
        if (cond() and s["num_running"] == 0 and s["num_waiting"] == 0
                and s["num_free_kv_blocks"] == s["num_kv_blocks"]):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine not idle: {eng.stats()}")


def test_generate_cumulative_and_final():
    async def main():
        eng, _ = await _started(step_time=0.001)
        try:
            outs = [o async for o in eng.generate("hi", SamplingParams(max_tokens=8, temperature=0))]
            texts = [o.outputs[0].text for o in outs]
            assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative
            assert outs[-1].finished and texts[-1] == "The quic"
            assert outs[-1].outputs[0].finish_reason == "length"
        finally:
            eng.shutdown()

    asyncio.run(main())


def test_slow_consumer_does_not_stall_others():
    async def main():
        eng, _ = await _started(step_time=0.002)
        try:
            slow = eng.generate("a", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
            first = await slow.__anext__()  # then stop reading it for a while
            assert not first.finished
            t0 = asyncio.get_running_loop().time()
            fast = [o async for o in eng.generate("b", SamplingParams(max_tokens=20, temperature=0))]
            assert fast[-1].finished
            assert asyncio.get_running_loop().time() - t0 < 5
            # the slow one kept only the latest (cumulative) output: one read catches up
            rest = [o async for o in slow]
            assert rest[-1].finished and len(rest[-1].outputs[0].token_ids) == 200
            assert len(rest) < 200
        finally:
            eng.shutdown()

    asyncio.run(main())


def test_cancel_aborts_in_engine():
    async def main():
        eng, fake = await _started(step_time=0.002)
        try:
            async def consume():
                async for _ in eng.generate("a", SamplingParams(max_tokens=400, ignore_eos=True), "req-x"):
                    pass

            task = asyncio.ensure_future(consume())
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await _wait_idle(eng, lambda: "req-x" in fake.aborted)
            assert eng.num_active_streams == 0
        finally:
            eng.shutdown()

    asyncio.run(main())


def test_break_out_of_iteration_aborts():
    async def main():
        eng, fake = await _started(step_time=0.002)
        try:
            gen = eng.generate("a", SamplingParams(max_tokens=400, ignore_eos=True), "req-y")
            async for _ in gen:
                break
            await gen.aclose()
            await _wait_idle(eng, lambda: "req-y" in fake.aborted)
        finally:
            eng.shutdown()

    asyncio.run(main())


def test_add_errors_propagate():
    async def main():
        eng, _ = await _started(max_model_len=64)
        try:
            with pytest.raises(InvalidPromptError) as ei:
                await eng.add_request("r1", "x" * 100, SamplingParams(max_tokens=4))
            assert "64" in str(ei.value) and "100" in str(ei.value)
            with pytest.raises(ValueError):
                await eng.add_request("r2", ChatPrompt([{"role": "bogus", "content": "x"}]), SamplingParams())
            with pytest.raises(InvalidPromptError) as ei:
                await eng.add_request("r3", "x" * 30, SamplingParams(max_tokens=40))
            assert ei.value.param == "max_tokens"
            # the engine keeps serving afterwards
            outs = [o async for o in eng.generate("ok", SamplingParams(max_tokens=3, temperature=0))]
            assert outs[-1].finished
            assert eng.num_active_streams == 0
        finally:
            eng.shutdown()

    asyncio.run(main())


def test_crash_fails_inflight_then_recovers():
    """A transient fault in step(): the request in flight fails (EngineCrashedError, a 500 for the
    API), the engine aborts everything, passes its integrity check and serves the next request.
    (Until issue #11 a crash left the engine dead; that is now only the case when even a rebuild
    fails, see test_persistent_fault_rebuild_fails_then_dead.)"""
    async def main():
        eng, fake = await _started(step_time=0.001, fail_steps={5})
        try:
            with pytest.raises(EngineCrashedError):
                async for _ in eng.generate("a", SamplingParams(max_tokens=100)):
                    pass
            await _wait_idle(eng)
            assert eng.healthy and eng.state == "ready"
            assert eng.num_faults == 1 and eng.num_recoveries == 1 and eng.num_restarts == 0
            assert eng.num_failed_requests == 1 and "transient fault" in eng.last_fault
            assert fake.integrity_checks >= 1 and not fake.running and not fake.waiting
            outs = [o async for o in eng.generate("again", SamplingParams(max_tokens=5, temperature=0))]
            assert outs[-1].finished and outs[-1].outputs[0].text == "The q"
            assert eng._engine is fake  # the same engine: no rebuild was needed
        finally:
            eng.shutdown()

    asyncio.run(main())


def test_broken_integrity_rebuilds_engine():
    async def main():
        built = []

        def factory():
            built.append(FakeEngine(step_time=0.001, fail_steps={3} if not built else set(), corrupt_on_fault=True))
            return built[-1]

        eng = AsyncEngine(factory)
        eng.start()
        for _ in range(500):
            if eng.ready:
                break
            await asyncio.sleep(0.01)
        try:
            with pytest.raises(EngineCrashedError):
                async for _ in eng.generate("a", SamplingParams(max_tokens=100)):
                    pass
            for _ in range(300):
                if eng.num_restarts == 1 and eng.ready:
                    break
                await asyncio.sleep(0.01)
            assert eng.num_faults == 1 and eng.num_recoveries == 0 and eng.num_restarts == 1
            assert len(built) == 2 and eng._engine is built[1]
            outs = [o async for o in eng.generate("b", SamplingParams(max_tokens=4, temperature=0))]
            assert outs[-1].finished and eng.healthy
        finally:
            eng.shutdown()

    asyncio.run(main())


def test_persistent_fault_rebuild_fails_then_dead():
    async def main():
        eng, _ = await _started(step_time=0.001, crash_after_steps=5)
        try:
            with pytest.raises(RequestFailedError):  # EngineCrashedError or EngineDeadError
                async for _ in eng.generate("a", SamplingParams(max_tokens=100)):
                    pass
            for _ in range(300):
                if eng.state == "dead":
                    break
                await asyncio.sleep(0.01)
            assert not eng.healthy and eng.state == "dead"
            assert "simulated engine crash" in eng.error and "rebuild failed" in eng.error
            with pytest.raises(EngineDeadError):
                await eng.add_request("again", "a", SamplingParams())
        finally:
            eng.shutdown()

    asyncio.run(main())


def test_fault_while_adding_fails_only_that_request():
    async def main():
        eng, fake = await _started(step_time=0.001)
        real_add = fake.add_request
        calls = {"n": 0}

        def flaky_add(*a, **kw):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("simulated fault in add_request")
            return real_add(*a, **kw)

        fake.add_request = flaky_add
        try:
            with pytest.raises(EngineCrashedError):
                await eng.add_request("r1", "a", SamplingParams(max_tokens=3))
            outs = [o async for o in eng.generate("b", SamplingParams(max_tokens=3, temperature=0))]
            assert outs[-1].finished and eng.num_recoveries == 1
        finally:
            eng.shutdown()

    asyncio.run(main())


def test_deadline_times_out_and_aborts():
    async def main():
        eng, fake = await _started(step_time=0.002)
        try:
            loop = asyncio.get_running_loop()
            stream = await eng.add_request("slow", "a", SamplingParams(max_tokens=400, ignore_eos=True),
                                           deadline=loop.time() + 0.2)
            t0 = loop.time()
            with pytest.raises(RequestTimeoutError):
                async for _ in stream:
                    pass
            assert 0.1 < loop.time() - t0 < 2
            eng.abort("slow")
            await _wait_idle(eng, lambda: "slow" in fake.aborted)
        finally:
            eng.shutdown()

    asyncio.run(main())
