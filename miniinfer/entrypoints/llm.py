"""The offline API, named as vLLM's: ``LLM(...).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

import itertools
from typing import Any, Sequence as Seq

from tqdm.auto import tqdm

from miniinfer.config import EngineConfig, offline_max_num_batched_tokens
from miniinfer.engine.llm_engine import LLMEngine
from miniinfer.outputs import RequestOutput
from miniinfer.sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]


class LLM:
    def __init__(self, model: str | None = None, **kwargs: Any):
        progress = kwargs.pop("progress", True)
        if kwargs.get("max_num_batched_tokens") is None:
            kwargs["max_num_batched_tokens"] = offline_max_num_batched_tokens(kwargs.get("device", "auto"))
        self.engine_config = EngineConfig(model=model, **kwargs)
        self.engine = LLMEngine(self.engine_config, progress=progress)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def _normalize(self, prompts) -> list[PromptType]:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]  # one prompt given as token ids
        return prompts

    def generate(self, prompts, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        prompts = self._normalize(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        ids = []
        try:
            for p, sp in zip(prompts, params):
                rid = str(next(self._ids))
                if isinstance(p, dict):
                    if "prompt_token_ids" in p:
                        self.engine.add_request(rid, list(p["prompt_token_ids"]), sp, stream=False)
                    elif "prompt" in p:
                        self.engine.add_request(rid, p["prompt"], sp, stream=False)
                    else:
                        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
                else:
                    self.engine.add_request(rid, p, sp, stream=False)
                ids.append(rid)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", disable=not use_tqdm or len(ids) < 2)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        self.engine.on_idle()
        return [done[rid] for rid in ids]

    def chat(self, messages, sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """``messages``: one conversation (list of {role, content}) or a list of them."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.engine.apply_chat_template(c) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)
