"""Recovery of the engine thread after a fault (see ``async_engine.py``, "Faults")."""
from __future__ import annotations

import logging
import time
import traceback
from typing import Any

from miniinfer.server.request_stream import EngineCrashedError

logger = logging.getLogger("miniinfer.server")


def recover(aeng: Any, engine: Any, fault: Exception) -> Any:
    """After ``fault`` (any exception of the engine loop): fail the requests in flight of the
    ``AsyncEngine`` ``aeng``, then abort everything in the engine and check it (on_idle,
    check_integrity); if that fails, rebuild it with the factory. Returns the engine to go on
    with, or None when even the rebuild failed (the engine is dead)."""
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
        recovery_error = f"{type(e).__name__}: {e}"
    else:
        aeng.num_recoveries += 1
        aeng.last_recovery_s = time.monotonic() - t0
        aeng._update_stats(force=True)
        logger.warning("engine recovered in %.3f s after a fault (%d requests failed)",
                       aeng.last_recovery_s, len(failed))
        return engine
    aeng.state = "restarting"
    try:
        if hasattr(engine, "shutdown"):
            engine.shutdown()
    except Exception:  # noqa: BLE001
        logger.exception("shutting the broken engine down failed")
    del engine
    aeng._engine = None
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
    logger.warning("engine rebuilt in %.3f s after a fault (%d requests failed)",
                   aeng.last_recovery_s, len(failed))
    return engine
