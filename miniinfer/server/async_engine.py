"""Run the synchronous ``LLMEngine`` in one background thread and serve it to asyncio.

Threading model
---------------
* The **engine thread** owns the ``LLMEngine`` (which is not thread-safe): it loads it,
  then loops: drain the command queue (add / abort), call ``step()`` while there is
  work, and block on the queue when idle. Tokenization and chat templating of new
  requests also run here, so the event loop never does CPU-heavy work.
* The **event loop** never touches the engine. Each request gets a
  :class:`RequestStream`; after every step the engine thread posts the step's outputs
  with one ``loop.call_soon_threadsafe`` call, and the loop hands each output to its
  stream. Outputs are cumulative, so a stream keeps only the latest one: a slow
  consumer simply sees bigger deltas, memory stays bounded, and nobody waits on it.
* A consumer that stops early (client disconnect, cancellation) aborts its request;
  the engine frees its KV blocks at the next loop iteration.
* **Faults.** If ``step()`` (or anything else the loop does with the engine) raises, the
  thread does not die: every request in flight fails with :class:`EngineCrashedError`
  (a 500 for the API; streams get an error event, then ``[DONE]``), then the engine is
  *recovered*: every request it still holds is aborted (which frees its KV blocks) and
  ``on_idle()`` / ``check_integrity()`` must pass (``num_recoveries``). If that fails, the
  engine is *rebuilt* with the factory (model reload, ``num_restarts``; ``state`` is
  "restarting" meanwhile and new requests get a 503). Only when the rebuild fails too is
  the engine dead: in-flight and new requests fail with :class:`EngineDeadError`, and
  ``healthy`` stays False. Commands queued during a recovery are served afterwards.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from miniinfer.engine.input_processor import InvalidPromptError
from miniinfer.outputs import RequestOutput
from miniinfer.sampling_params import SamplingParams
from miniinfer.server.request_stream import (  # noqa: F401  (re-exported: the server's names)
    ChatPrompt, EngineCrashedError, EngineDeadError, EngineNotReadyError, Prompt, RequestFailedError,
    RequestStream, RequestTimeoutError, ServerDrainingError, snapshot,
)

logger = logging.getLogger("miniinfer.server")
_STOP = object()  # the command that ends the engine thread


_EMPTY_STATS = {
    "num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0, "prompt_tokens_total": 0,
    "generation_tokens_total": 0, "prefix_cache_queries": 0, "prefix_cache_hits": 0,
    "num_preemptions": 0, "num_kv_blocks": 0, "num_free_kv_blocks": 0, "num_deferred_steps": 0,
}


class AsyncEngine:
    """Asyncio front of a synchronous engine running in a dedicated thread.

    ``engine_factory`` builds the engine inside the engine thread (model loading may
    take a while; ``state`` is "loading" until it returns).
    """

    def __init__(self, engine_factory: Callable[[], Any], stats_interval_s: float = 0.1) -> None:
        self._factory = engine_factory
        self._stats_interval = stats_interval_s
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestStream] = {}  # event-loop side
        self._engine: Any = None
        self.state = "created"  # created | loading | ready | dead | stopped
        self.error: str | None = None
        self.model_name: str | None = None
        self.max_model_len: int | None = None
        self.load_time_s: float | None = None
        self._stats: dict = dict(_EMPTY_STATS, time=time.monotonic())
        self._last_stats_t = 0.0
        self._active: set[str] = set()  # engine-thread side: accepted, not yet finished
        self._active_at_last_stats = 0
        self.on_request_finished: Callable[[RequestOutput], None] | None = None
        # faults (written by the engine thread, read anywhere)
        self.num_faults = 0  # exceptions caught in the engine loop
        self.num_recoveries = 0  # faults recovered by aborting everything (same engine)
        self.num_restarts = 0  # faults that needed a rebuild with the factory (model reload)
        self.num_failed_requests = 0  # requests failed by faults
        self.last_fault: str | None = None
        self.last_recovery_s: float | None = None  # fault caught -> serving again

    # ------------------------------------------------------------------ lifecycle
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self._thread is not None:
            return
        self._loop = loop or asyncio.get_running_loop()
        self.state = "loading"
        self._thread = threading.Thread(target=self._thread_main, name="miniinfer-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._cmds.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)
        if self.state != "dead":
            self.state = "stopped"

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def healthy(self) -> bool:
        return self.state == "ready" and self._thread is not None and self._thread.is_alive()

    def fault_info(self) -> dict:
        """Fault counters for ``/health`` and the metrics."""
        return {"faults": self.num_faults, "recoveries": self.num_recoveries, "restarts": self.num_restarts,
                "failed_requests": self.num_failed_requests, "last_fault": self.last_fault,
                "last_recovery_s": None if self.last_recovery_s is None else round(self.last_recovery_s, 4)}

    @property
    def num_active_streams(self) -> int:
        return len(self._streams)

    def stats(self) -> dict:
        """The latest engine stats (refreshed by the engine thread; safe from any thread)."""
        return self._stats

    # ------------------------------------------------------------------ requests
    async def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams,
                          deadline: float | None = None) -> RequestStream:
        """Queue a request; returns its stream once the engine accepted it.

        ``deadline`` (event-loop time) bounds the wait for acceptance and the stream's
        iteration: past it, :class:`RequestTimeoutError` is raised (the caller aborts).
        Raises ``ValueError`` (incl. :class:`InvalidPromptError`) for prompts the engine
        rejects, :class:`EngineNotReadyError` while loading or being rebuilt,
        :class:`EngineDeadError` once the engine is dead.
        """
        if self.state == "dead":
            raise EngineDeadError(self.error or "engine is dead")
        if self.state == "restarting":
            raise EngineNotReadyError("the engine is being rebuilt after a fault")
        if self.state != "ready":
            raise EngineNotReadyError("the model is still loading")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = RequestStream(request_id)
        stream.deadline = deadline
        self._streams[request_id] = stream  # counted by a drain from now on
        compile_grammar = getattr(self._engine, "compile_grammar", None)
        if params.structured_outputs is not None and compile_grammar is not None:
            # off the engine thread and the event loop: the engine's add is then a cache hit
            try:
                await asyncio.get_running_loop().run_in_executor(None, compile_grammar, params)
            except BaseException:
                self._streams.pop(request_id, None)
                raise
        self._cmds.put(("add", request_id, prompt, params, stream))
        try:
            if deadline is None:
                stream.prompt_token_ids = await stream._added
            else:
                timeout = max(0.0, deadline - asyncio.get_running_loop().time())
                try:
                    stream.prompt_token_ids = await asyncio.wait_for(asyncio.shield(stream._added), timeout)
                except asyncio.TimeoutError:
                    self.abort(request_id)
                    raise RequestTimeoutError("the request ran past the server's time limit before it "
                                              "was accepted and was aborted") from None
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return stream

    async def generate(self, prompt: Prompt, params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs until the request finishes; aborts it if the consumer stops."""
        request_id = request_id or uuid.uuid4().hex
        stream = await self.add_request(request_id, prompt, params)
        try:
            async for out in stream:
                yield out
        finally:
            if not stream.finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (call on the event loop). Safe for unknown or finished ids."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.aborted = True
            stream._event.set()
        if self.state in ("ready", "loading", "restarting"):
            self._cmds.put(("abort", request_id))

    def fail_all(self, exc: BaseException) -> int:
        """Fail every request in flight with ``exc`` and abort it in the engine (call on the
        event loop; the shutdown drain uses it after the grace period). Returns how many."""
        streams = list(self._streams.values())
        for s in streams:
            self.abort(s.request_id)
            s._fail(exc)
        return len(streams)

    # ------------------------------------------------------------------ event-loop side
    def _post(self, fn: Callable, *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed during shutdown
            pass

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.error is not None:
                stream._fail(RequestFailedError(out.error))
            else:
                stream._put(out)
            if out.finished:
                del self._streams[out.request_id]
                if self.on_request_finished is not None:
                    try:
                        self.on_request_finished(out)
                    except Exception:  # metrics must never break serving
                        logger.exception("on_request_finished hook failed")

    def _accepted(self, stream: RequestStream, prompt_token_ids: list[int]) -> None:
        if not stream._added.done():
            stream._added.set_result(prompt_token_ids)

    def _rejected(self, stream: RequestStream, exc: BaseException) -> None:
        if not stream._added.done():
            stream._added.set_exception(exc)
        self._streams.pop(stream.request_id, None)

    def _fail_all(self, exc: BaseException) -> None:
        streams = list(self._streams.values())
        self._streams.clear()
        for s in streams:
            s._fail(exc)

    def _fail_ids(self, request_ids: list[str], exc: BaseException) -> None:
        for rid in request_ids:
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream._fail(exc)

    # ------------------------------------------------------------------ engine thread
    def _thread_main(self) -> None:
        t0 = time.monotonic()
        try:
            engine = self._build()
        except BaseException as e:  # noqa: BLE001 - report any load failure
            logger.error("engine failed to load: %s", traceback.format_exc())
            self.error = f"engine failed to load: {type(e).__name__}: {e}"
            self.state = "dead"
            self._drain_rejecting(EngineDeadError(self.error))
            return
        self.load_time_s = time.monotonic() - t0
        self._update_stats(force=True)
        self.state = "ready"
        logger.info("engine ready in %.1f s (model %s, max_model_len %d)",
                    self.load_time_s, self.model_name, self.max_model_len)
        from miniinfer.server.recovery import rebuild, recover_in_place, shut_down
        while True:
            try:
                self._loop_forever(engine)
                return  # stopped
            except Exception as e:  # noqa: BLE001 - any fault: fail what is in flight, then recover
                fault_text, failure = recover_in_place(self, engine, e)
            except BaseException as e:  # noqa: BLE001
                logger.error("engine thread crashed: %s", traceback.format_exc())
                self._die(f"engine crashed: {type(e).__name__}: {e}")
                return
            if failure is None:
                continue
            # out of the except block: the fault's traceback (and the engine in its frames) is gone
            self.state = "restarting"
            shut_down(engine)
            engine = None
            engine = rebuild(self, fault_text, failure)
            if engine is None:
                return

    def _build(self) -> Any:
        engine = self._factory()
        self._engine = engine
        self.model_name = getattr(engine, "model_name", None) or "miniinfer"
        self.max_model_len = int(engine.max_model_len)
        return engine

    def _die(self, error: str) -> None:
        self.error = error
        self.state = "dead"
        exc = EngineDeadError(self.error)
        self._active.clear()
        self._post(self._fail_all, exc)
        self._drain_rejecting(exc)

    def _drain_rejecting(self, exc: BaseException) -> None:
        """After death: fail queued adds now; later adds are refused by add_request()."""
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return
            if cmd is not _STOP and cmd[0] == "add":
                self._post(self._rejected, cmd[4], exc)

    def _loop_forever(self, engine: Any) -> None:
        while True:
            if not engine.has_unfinished_requests():
                self._update_stats(force=True)
                if hasattr(engine, "on_idle"):
                    engine.on_idle(raise_errors=False)
                cmd = self._cmds.get()  # idle: block until there is something to do
                if cmd is _STOP or not self._handle(engine, cmd):
                    return
            while True:  # drain everything queued so far
                try:
                    cmd = self._cmds.get_nowait()
                except queue.Empty:
                    break
                if cmd is _STOP or not self._handle(engine, cmd):
                    return
            if not engine.has_unfinished_requests():
                continue
            outputs = engine.step()
            if outputs:
                snaps = [snapshot(o) for o in outputs]
                for o in snaps:
                    if o.finished:
                        self._active.discard(o.request_id)
                self._post(self._dispatch, snaps)
            # Stats are throttled, except when the set of requests changed (added, finished,
            # aborted): a reader must never see an idle snapshot while a request streams.
            self._update_stats(force=len(self._active) != self._active_at_last_stats)

    def _handle(self, engine: Any, cmd: tuple) -> bool:
        kind = cmd[0]
        if kind == "abort":
            rid = cmd[1]
            if rid in self._active:
                self._active.discard(rid)
                engine.abort_request(rid)
            return True
        if kind == "add":
            _, rid, prompt, params, stream = cmd
            try:
                token_ids = self._add(engine, rid, prompt, params)
            except (ValueError, TypeError) as e:
                self._post(self._rejected, stream, e if isinstance(e, ValueError) else ValueError(str(e)))
                return True
            except Exception as e:  # noqa: BLE001 - template errors etc. are the request's fault
                if type(e).__module__.startswith("jinja2"):
                    self._post(self._rejected, stream, InvalidPromptError(f"chat template error: {e}", "messages"))
                    return True
                # an engine fault while adding: this request fails, then the engine recovers
                self._post(self._rejected, stream, EngineCrashedError(f"engine fault: {type(e).__name__}: {e}"))
                raise
            self._active.add(rid)
            self._post(self._accepted, stream, token_ids)
            return True
        raise RuntimeError(f"unknown engine command {kind!r}")

    @staticmethod
    def _add(engine: Any, rid: str, prompt: Prompt, params: SamplingParams) -> list[int]:
        """Render a chat, then the engine's input processor checks everything (OpenAI context
        policy: an unset max_tokens is the rest of the context) and queues the request."""
        if isinstance(prompt, ChatPrompt):
            text = engine.apply_chat_template(prompt.messages)
            return engine.add_request(rid, text, params, openai=True, field="messages")
        return engine.add_request(rid, prompt, params, openai=True)

    def _update_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_stats_t < self._stats_interval:
            return
        self._last_stats_t = now
        engine = self._engine
        if engine is None:
            return
        s = dict(_EMPTY_STATS)
        s.update(engine.stats())
        s["time"] = now
        self._active_at_last_stats = len(self._active)
        self._stats = s  # atomic reference swap; readers never see a half-built dict
