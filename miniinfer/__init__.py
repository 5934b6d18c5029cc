"""MiniInfer: a compact, fast LLM inference engine."""
from miniinfer.outputs import CompletionOutput, Logprob, RequestOutput
from miniinfer.sampling_params import SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]


def __getattr__(name):
    if name == "LLM":  # lazy: importing miniinfer stays cheap
        from miniinfer.entrypoints.llm import LLM
        return LLM
    raise AttributeError(name)


def _setup_logging() -> None:
    """Like vLLM: engine start-up facts (KV blocks, graphs, load time) go to stderr at INFO
    unless the application configured the ``miniinfer`` logger itself."""
    import logging
    import os
    logger = logging.getLogger("miniinfer")
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s miniinfer: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("MINIINFER_LOG_LEVEL", "INFO"))
    logger.propagate = False


_setup_logging()
