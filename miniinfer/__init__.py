"""MiniInfer: a compact, fast LLM inference engine."""
from miniinfer.outputs import CompletionOutput, Logprob, RequestOutput
from miniinfer.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]


def __getattr__(name):
    if name == "LLM":  # lazy: importing miniinfer stays cheap
        from miniinfer.entrypoints.llm import LLM
        return LLM
    raise AttributeError(name)
