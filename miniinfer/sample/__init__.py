"""Sampling: ``SamplingMetadata`` (a step's parameters as tensors), the ordered logits
processors, and the sampler. Speculative decoding adds its rejection sampler here."""
from miniinfer.sample.metadata import SamplingMetadata
from miniinfer.sample.sampler import SamplerOutput, sample

__all__ = ["SamplingMetadata", "SamplerOutput", "sample"]
