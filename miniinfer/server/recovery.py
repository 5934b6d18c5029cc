"""Recovery of the engine thread after a fault (see ``async_engine.py``, "Faults").

Two stages. ``recover_in_place`` fails the requests in flight, aborts everything the engine
holds and checks it (``on_idle``, ``check_integrity``). If that fails, ``rebuild`` makes a new
engine with the factory, after the caller has dropped every reference to the old one and its
fault (a traceback's frames hold the engine: on a GPU its weights and KV cache would still
take the memory the new engine sizes itself from).
"""
from __future__ import annotations

import gc
import logging
import time
import traceback
from typing import Any

from miniinfer.server.request_stream import EngineCrashedError

logger = logging.getLogger("miniinfer.server")


def recover_in_place(aeng: Any, engine: Any, fault: Exception) -> tuple[str, str | None]:
    """Fail the requests in flight of the ``AsyncEngine`` ``aeng`` and reset ``engine``.
    Returns ``(fault text, None)`` when the engine can go on, else ``(fault text, why not)``."""
    t0 = time.monotonic()
    fault_text = f"{type(fault).__name__}: {fault}"
    logger.error("engine fault (%d requests in flight): %s", len(aeng._active), traceback.format_exc())
    aeng.num_faults += 1
    aeng.last_fault = fault_text
    failed = list(aeng._active)
    aeng._active.clear()
    aeng.num_failed_requests += len(failed)
    aeng._post(aeng._fail_ids, failed, EngineCrashedError(f"engine fault: {fault_text}"))
    try:
        for rid in failed:
            engine.abort_request(rid)
        for rid in list(getattr(engine, "requests", None) or ()):  # anything we did not track
            engine.abort_request(rid)
        if engine.has_unfinished_requests():
            raise RuntimeError("requests are left in the engine after aborting all of them")
        if hasattr(engine, "on_idle"):
            engine.on_idle(raise_errors=True)
        if hasattr(engine, "check_integrity"):
            engine.check_integrity()
    except Exception as e:  # noqa: BLE001 - the engine's state is not trustworthy: rebuild it
        logger.error("recovery failed (%s: %s); rebuilding the engine", type(e).__name__, e)
        return fault_text, f"{type(e).__name__}: {e}"
    aeng.num_recoveries += 1
    aeng.last_recovery_s = time.monotonic() - t0
    aeng._update_stats(force=True)
    logger.warning("engine recovered in %.3f s after a fault (%d requests failed)", aeng.last_recovery_s,
                   len(failed))
    return fault_text, None


def shut_down(engine: Any) -> None:
    try:
        if hasattr(engine, "shutdown"):
            engine.shutdown()
    except Exception:  # noqa: BLE001
        logger.exception("shutting the broken engine down failed")


def rebuild(aeng: Any, fault_text: str, recovery_error: str) -> Any:
    """A new engine from the factory (the old one must be unreferenced by now). Returns it,
    or None when the rebuild failed too (the engine is dead)."""
    t0 = time.monotonic()
    aeng.state = "restarting"
    aeng._engine = None
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass
    try:
        engine = aeng._build()
    except Exception as e:  # noqa: BLE001
        logger.error("engine rebuild failed: %s", traceback.format_exc())
        aeng._die(f"engine crashed ({fault_text}); recovery failed ({recovery_error}); "
                  f"rebuild failed: {type(e).__name__}: {e}")
        return None
    aeng.num_restarts += 1
    aeng.last_recovery_s = time.monotonic() - t0
    aeng._update_stats(force=True)
    aeng.state = "ready"
    logger.warning("engine rebuilt in %.3f s after a fault", aeng.last_recovery_s)
    return engine
