"""Host time per engine step, by phase: which part of the host chain a step waits on.

    timer = StepPhases(llm.engine)     # wraps the engine's phase methods (instance attributes)
    timer.reset(); llm.generate(...); phases = timer.summary()   # {phase: mean µs per step}
    timer.remove()

Phases (wall time on the engine thread, perf_counter, summed over a step's calls and divided
by the number of ``step()`` calls): ``schedule`` (scheduler.schedule), ``forward`` (input
preparation + queueing the forward: runner.forward, which is ``prepare`` = prepare_forward, packing
and staging the inputs, then ``run`` = run_forward, queueing the model), ``sample`` (runner.sample: with structured
output, the bitmask fill and queueing the sampler; for plain steps it runs inside ``launch``),
``launch`` (runner.launch = forward + sample together: the path of steps without a grammar),
``collect`` (waiting for a step's sampled ids: runner.collect), ``process`` (detokenize, stop
checks, grammar matchers advanced: engine._process), ``grammar_wait`` (deferred sampling: waiting
for the grammar thread's fill, structured_output.finish_step), and ``step`` (all of ``step()``). Nested
phases are also counted in their parents (``launch`` holds a ``forward`` and a ``sample``).
``other`` = step − (schedule + prepare + run + sample + collect + process + grammar_wait) is left over.
Only for benchmarks: wrapping costs ~1 µs per call."""
from __future__ import annotations

import time
from collections import defaultdict


class StepPhases:
    PHASES = {"schedule": ("scheduler", "schedule"), "forward": ("runner", "forward"),
              "prepare": ("runner", "prepare_forward"), "run": ("runner", "run_forward"),
              "sample": ("runner", "sample"), "launch": ("runner", "launch"),
              "collect": ("runner", "collect"), "process": (None, "_process"),
              "grammar_wait": ("_structured", "finish_step"), "step": (None, "step")}

    def __init__(self, engine):
        self.engine = engine
        self.totals: dict[str, float] = defaultdict(float)
        self._patched: list[tuple[object, str]] = []
        for phase, (owner, name) in self.PHASES.items():
            obj = engine if owner is None else getattr(engine, owner)
            if obj is None:  # no structured output yet
                continue
            setattr(obj, name, self._wrap(phase, getattr(obj, name)))
            self._patched.append((obj, name))

    def _wrap(self, phase: str, fn):
        totals = self.totals

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[phase] += time.perf_counter() - t
                if phase == "step":
                    totals["steps"] += 1
        return timed

    def reset(self) -> None:
        self.totals.clear()

    def summary(self) -> dict[str, float]:
        """Mean µs per ``step()`` call of every phase, plus ``steps`` (the count) and ``other``."""
        steps = self.totals.get("steps", 0)
        if not steps:
            return {"steps": 0}
        out = {k: v / steps * 1e6 for k, v in self.totals.items() if k != "steps"}
        # launch = forward + sample and forward = prepare + run (they call the wrapped
        # methods): counted through those
        known = sum(out.get(k, 0.0) for k in ("schedule", "prepare", "run", "sample", "collect", "process",
                                              "grammar_wait"))
        out["other"] = out.get("step", 0.0) - known
        out["steps"] = steps
        return {k: round(v, 1) for k, v in out.items()}

    def remove(self) -> None:
        for obj, name in self._patched:
            try:
                delattr(obj, name)  # back to the class's method
            except AttributeError:
                pass
        self._patched.clear()
