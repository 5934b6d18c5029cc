"""Structured output through xgrammar (imported lazily: the GPU fast path doesn't need it).

``StructuredOutputManager`` (one per engine) compiles a request's constraint into a grammar
(cached, off the engine thread where the front end allows, with size and time limits), gives
each constrained sequence its own ``GrammarMatcher``, and once per step fills the token
bitmask of the constrained rows: the runner calls ``fill_bitmask`` between the forward and
the sampler, so the host fills it while the device runs the forward.
"""
from miniinfer.structured_output.manager import GrammarBitmask, StructuredOutputManager

__all__ = ["GrammarBitmask", "StructuredOutputManager"]
