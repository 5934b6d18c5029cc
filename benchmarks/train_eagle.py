#!/usr/bin/env python
"""Train an EAGLE draft head for the embedded SmolLM2-135M-Instruct by self-distillation.

Li et al., "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty" (2024);
EAGLE-2 (2024). The head (``miniinfer/spec_decode/eagle_head.py`` runs it in the engine) maps
``concat([embed(x_p), f_{p-1}])`` through ``fc`` + one Llama decoder layer + RMSNorm to
``h_p ≈ f_p``, where ``f_p`` is the target's post-norm final hidden state.

Pipeline (one H200: about 4 minutes end to end; ``--quick`` runs a tiny version on CPU):

1. prompts: ``--num-prompts`` chats from a ``--mix`` of sources (``benchmarks/eagle_prompts.py``):
   user prompts the target itself writes in a first generation pass (temperature 0.9, few-shot
   writer instructions over a large topic pool, cleaned and deduplicated), real text of local files
   (stdlib / site-packages / repo docs, docstrings and functions wrapped in "Summarize this:",
   "Explain this code:" ...), the original templates × topics, and two-turn chats built on the
   target's own first answers; a few with a system prompt. Nothing near a prompt of the held-out
   ``benchmarks/eagle_eval_prompts.json`` (used only for evaluation) is kept; a random
   ``--val-frac`` of the training prompts is held out too (per-source numbers in the metrics);
2. responses from our engine (the embedded SmolLM2), a ``--greedy-frac`` share greedy (default
   half), the rest at temperature 0.7; the held-out eval prompts greedy; ``--save-data`` keeps the
   sequences (JSON) and ``--load-data`` trains on them again (a longer run in another call,
   no generation; ``--data-only`` stops after writing them);
3. features ``f_p`` of every position of prompt + response, from our engine's own model through
   the paged path (exactly what the drafter sees at inference; ``--check-features`` compares
   them with HF transformers' post-norm hidden states on CPU in fp32);
4. training (fp32 master weights, bf16 autocast on CUDA): SmoothL1(h_p, f_p) + 0.1 × soft CE
   between LM-head(h_p) and softmax(LM-head(f_p)), uniform noise on the input features; with
   ``--train-depth 2`` also the second draft step (the head's own output as the feature,
   weight ``--depth-weight``), which is what deeper drafts see; ``--ce-vocab draft`` takes the
   CE over the FR-Spec draft vocabulary only (what the drafter scores); ``--init FILE`` continues
   from an earlier head; the LR's cosine ends with whichever budget ends first (steps or
   ``--train-seconds``);
5. evaluation on held-out sequences: teacher-forced top-1 agreement with the target's argmax
   (the head's argmax over the draft vocabulary, as the drafter takes it), and the greedy acceptance of a ``--eval-depth``-token chain (mean accepted drafts).

Writes the head (safetensors fp16, HF-style names: ``fc.weight``, ``layers.0.*``, ``norm.weight``)
to ``--out`` and the metrics to ``--metrics`` (default: ``--out`` with ``.json``).

    python benchmarks/train_eagle.py --out eagle_smollm2.safetensors        # GPU
    python benchmarks/train_eagle.py --quick --device cpu --out /tmp/h.safetensors
    # the shipped head (session 14): generate once, then continue the session-7 head
    python benchmarks/train_eagle.py --out x --num-prompts 12000 --seed 1 --greedy-frac 0.75 \
        --max-num-seqs 512 --save-data data.json --data-only
    python benchmarks/train_eagle.py --out head.safetensors --load-data data.json --epochs 1000 \
        --train-seconds 440 --init OLD_HEAD.safetensors --lr 5e-4 --eval-depth 5
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import sys
import time
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)  # eagle_prompts
EVAL_PROMPTS = os.path.join(HERE, "eagle_eval_prompts.json")

from eagle_train_head import TrainHead, init_from_target, load_head, step_mask  # noqa: E402,F401  (tests use them)

# --- 1. prompts (sources in benchmarks/eagle_prompts.py) ------------------------------------------
def load_eval_prompts() -> list[str]:
    with open(EVAL_PROMPTS) as f:
        return json.load(f)["prompts"]


def parse_mix(text: str) -> dict[str, float]:
    mix = {k: float(v) for k, v in (kv.split("=") for kv in text.split(",") if kv.strip())}
    unknown = set(mix) - set(SOURCES)
    if unknown or not mix or min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise ValueError(f"--mix: bad {text!r} (sources: {', '.join(SOURCES)})")
    total = sum(mix.values())
    return {k: mix.get(k, 0.0) / total for k in SOURCES}


SOURCES = ("generated", "local_text", "template", "chat")


def build_items(llm, args, rng: random.Random) -> tuple[list[dict], dict]:
    """The training items ``{"source", "messages"}`` (shuffled; ``args.num_prompts`` of them
    unless a source runs short, then templates fill in) and their stats. With ``llm``, a first
    generation pass lets the target write user prompts (``generated``) and answer seed prompts
    (``chat``: user / answer / follow-up); without it those two sources are templates."""
    import eagle_prompts as EP
    mix, n = parse_mix(args.mix), args.num_prompts
    want = {k: int(round(mix[k] * n)) for k in SOURCES}
    leak = EP.LeakFilter(load_eval_prompts())
    stats: dict = {"requested": want, "leak_dropped": 0, "dup_dropped": 0}
    seen: set[str] = set()
    items: list[dict] = []

    def add(source: str, messages: list[dict]) -> bool:
        key = json.dumps(messages)
        if key in seen:
            stats["dup_dropped"] += 1
            return False
        if leak(EP.user_text(messages)):
            stats["leak_dropped"] += 1
            return False
        seen.add(key)
        items.append({"source": source, "messages": messages})
        return True

    t = time.time()
    for p in EP.local_text_prompts(want["local_text"], rng, args.local_max_chars, args.local_max_files,
                                   os.path.dirname(HERE)):
        add("local_text", [{"role": "user", "content": p}])
    stats["local_text_s"] = round(time.time() - t, 1)

    if llm is not None and (want["generated"] or want["chat"]):
        from miniinfer import SamplingParams
        t = time.time()
        writers = EP.writer_requests(int(want["generated"] * args.writer_oversample) + 1 if want["generated"] else 0, rng)
        seeds = [EP.template_prompt(rng) for _ in range(want["chat"])]
        reqs = writers + [[{"role": "user", "content": q}] for q in seeds]
        params = [SamplingParams(temperature=args.writer_temperature, top_p=0.95, max_tokens=args.writer_tokens, seed=args.seed + 10**6 + i)
                  for i in range(len(writers))]
        params += [SamplingParams(temperature=0.7, top_p=0.95, max_tokens=args.chat_answer_tokens,
                                  seed=args.seed + 2 * 10**6 + i) for i in range(len(seeds))]
        outs = llm.generate([llm.engine.apply_chat_template(m) for m in reqs], params, use_tqdm=False)
        texts = [o.outputs[0].text for o in outs]
        n_gen = 0
        for raw in texts[:len(writers)]:
            if n_gen >= want["generated"]:
                break
            p = EP.clean_generated(raw)
            if p is not None and add("generated", [{"role": "user", "content": p}]):
                n_gen += 1
        stats["writer_requests"], stats["writer_kept"] = len(writers), n_gen
        for msgs in EP.chat_items(seeds, texts[len(writers):], rng):
            add("chat", msgs)
        stats["first_pass_s"] = round(time.time() - t, 1)
        stats["first_pass_tokens"] = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outs)

    while sum(it["source"] == "template" for it in items) < want["template"] or len(items) < n:
        add("template", [{"role": "user", "content": EP.template_prompt(rng)}])
    rng.shuffle(items)
    items = items[:n] if len(items) > n else items
    for it in items:  # a few system prompts, of every source
        if rng.random() < args.system_frac:
            it["messages"] = [{"role": "system", "content": rng.choice(EP.SYSTEMS)}] + it["messages"]
    counts = {k: sum(it["source"] == k for it in items) for k in SOURCES}
    stats.update(prompts=len(items), per_source=counts,
                 with_system_prompt=sum(it["messages"][0]["role"] == "system" for it in items),
                 user_chars_mean=round(sum(len(EP.user_text(it["messages"])) for it in items) / max(1, len(items)), 1))
    return items, stats


def save_data(path: str, items: list[dict], seqs: list[tuple[list[int], int, bool]], n_prompts: int,
              stats: dict) -> None:
    """The generated sequences (token ids, prompt length, greedy?) and the prompt items, so a
    later run can train longer on the same data without generating it again (``--load-data``)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"items": items, "seqs": seqs, "n_prompts": n_prompts, "stats": stats}, f)


def load_data(path: str) -> tuple[list[dict], list[tuple[list[int], int, bool]], int, dict]:
    with open(path) as f:
        d = json.load(f)
    return d["items"], [tuple(s) for s in d["seqs"]], d["n_prompts"], d["stats"]


# --- 2./3. data: responses from our engine, features from our model --------------------------------
def generate(llm, chats: list[list[dict]], max_tokens: int, seed: int,
             greedy_frac: float = 0.5) -> list[tuple[list[int], int, bool]]:
    """(prompt + response token ids, prompt length, greedy?) per chat (a list of messages);
    a ``greedy_frac`` share of the rows (evenly spread) greedy, the others temperature 0.7.
    Prompts longer than max_model_len − max_tokens keep their last tokens (local files differ
    per machine; a long excerpt must not fail)."""
    from miniinfer import SamplingParams
    limit = llm.engine.max_model_len - max_tokens  # a longer prompt keeps its end (the assistant turn's start)
    texts = []
    for m in chats:
        ids = llm.engine.tokenize(llm.engine.apply_chat_template(m))
        texts.append({"prompt_token_ids": ids[-limit:]})
    share = Fraction(greedy_frac).limit_denominator(10 ** 6)  # exact: float multiples of 0.3 miss block edges
    greedy = [(i * share) % 1 < share for i in range(len(chats))]  # 0.5: even rows
    params = [SamplingParams(temperature=0.0, max_tokens=max_tokens) if g else
              SamplingParams(temperature=0.7, top_p=0.95, max_tokens=max_tokens, seed=seed + i)
              for i, g in enumerate(greedy)]
    outs = llm.generate(texts, params, use_tqdm=False)
    return [(list(o.prompt_token_ids) + list(o.outputs[0].token_ids), len(o.prompt_token_ids), g)
            for o, g in zip(outs, greedy)]


@torch.inference_mode()
def target_features(runner, seqs: list[list[int]], max_batch_tokens: int) -> list[torch.Tensor]:
    """f_p [len, H] (the model's dtype, on its device) of every position of each sequence:
    our model's forward (post-norm hidden) through the paged path, many prompts per forward
    over the runner's (idle) KV cache."""
    from miniinfer.attention.metadata import forward_context
    from miniinfer.worker.input_batch import meta_from_lists
    bs, dev = runner.block_size, runner.device
    budget = min(max_batch_tokens, (runner.num_blocks - len(seqs) - 1) * bs)
    out: list[torch.Tensor] = []
    i = 0
    while i < len(seqs):
        group, tokens = [], 0
        while i < len(seqs) and (not group or tokens + len(seqs[i]) <= budget):
            group.append(seqs[i])
            tokens += len(seqs[i])
            i += 1
        lens = [len(s) for s in group]
        tables, slots, block = [], [], 0
        for n in lens:
            nb = -(-n // bs)
            tables.append(list(range(block, block + nb)))
            slots.append(torch.arange(block * bs, block * bs + n))
            block += nb
        meta = meta_from_lists(lens, lens, tables, torch.cat(slots).to(dev), 0, dev)
        ids = torch.tensor([t for s in group for t in s], dtype=torch.int64, device=dev)
        pos = torch.cat([torch.arange(n) for n in lens]).to(dev)
        with forward_context(meta):
            hidden = runner.model(ids, pos)
        out.extend(hidden.split(lens))
    return out


class Data:
    """Sequences with their features, flat on the device; ``batch(idx)`` pads a group of
    sequences: ids [B, L], embeds [B, L, H], shifted feats f_{p-1} [B, L, H], target f [B, L, H],
    loss mask [B, L] (positions from the last prompt token on)."""

    def __init__(self, seqs, feats, embed_weight):
        self.ids = [torch.tensor(s[0]) for s in seqs]
        self.prompt_lens = [s[1] for s in seqs]
        self.greedy = [s[2] for s in seqs]
        self.feats = feats
        self.embed = embed_weight

    def __len__(self):
        return len(self.ids)

    def tokens(self, idx) -> int:
        return sum(len(self.ids[i]) for i in idx)

    def batch(self, idx: list[int]):
        dev, hidden = self.embed.device, self.embed.shape[1]
        length = max(len(self.ids[i]) for i in idx)
        ids = torch.zeros(len(idx), length, dtype=torch.int64)
        mask = torch.zeros(len(idx), length, dtype=torch.bool)
        f = torch.zeros(len(idx), length, hidden, dtype=self.feats[0].dtype, device=dev)
        for r, i in enumerate(idx):
            n = len(self.ids[i])
            ids[r, :n] = self.ids[i]
            mask[r, self.prompt_lens[i] - 1:n] = True
            f[r, :n] = self.feats[i]
        ids, mask = ids.to(dev), mask.to(dev)
        prev = torch.cat([f.new_zeros(len(idx), 1, hidden), f[:, :-1]], dim=1)
        return ids, self.embed[ids], prev, f, mask


def make_batches(data: Data, indices: list[int], max_tokens: int, rng: random.Random | None) -> list[list[int]]:
    """Groups of similar length (sorted, then chunked by padded tokens), shuffled if ``rng``."""
    order = sorted(indices, key=lambda i: len(data.ids[i]))
    batches, cur = [], []
    for i in order:
        if cur and len(data.ids[i]) * (len(cur) + 1) > max_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    if rng is not None:
        rng.shuffle(batches)
    return batches


# --- 4./5. training and evaluation ----------------------------------------------------------------
def lm_logits(x: torch.Tensor, lm_w: torch.Tensor) -> torch.Tensor:
    """The target's LM head on x [N, H] (in the head weight's dtype), float32 logits [N, V]."""
    return F.linear(x.to(lm_w.dtype), lm_w).float()


def head_loss(h, f, mask, lm_w, ce_weight: float):
    """SmoothL1(h, f) + ce_weight × CE(lm(h), softmax(lm(f))) over the masked positions."""
    hs, fs = h[mask].float(), f[mask].float()
    reg = F.smooth_l1_loss(hs, fs)
    with torch.no_grad():
        target = F.softmax(lm_logits(fs, lm_w), dim=-1)
    ce = -(target * F.log_softmax(lm_logits(hs, lm_w), dim=-1)).sum(-1).mean()
    return reg + ce_weight * ce, reg.detach(), ce.detach()


def _autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def _lr(step: int, progress: float, warmup: int, base: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``base`` to base / 10 as
    ``progress`` (0..1: steps or seconds, whichever budget is nearer its end) goes to 1."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train(head, data, train_idx, lm_w, args, device) -> dict:
    rng = random.Random(args.seed)
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    per_epoch = len(make_batches(data, train_idx, args.batch_tokens, None))
    total = args.max_steps or args.epochs * per_epoch
    weights = [1.0] + [args.depth_weight ** j for j in range(1, args.train_depth)]
    feat_std = float(torch.cat([data.feats[i].float().flatten() for i in train_idx[:64]]).std())
    step, t0, log = 0, time.time(), {}
    head.train()
    while step < total:
        for b in make_batches(data, train_idx, args.batch_tokens, rng):
            if step >= total or time.time() - t0 > args.train_seconds:
                break
            _, emb, prev, f, mask = data.batch(b)
            noise = (torch.rand_like(prev, dtype=torch.float32) * 2 - 1) * (args.noise * feat_std)
            # progress toward whichever end comes first, the step count or the time budget
            progress = max(step / max(total, 1), (time.time() - t0) / args.train_seconds)
            for g in opt.param_groups:
                g["lr"] = _lr(step, progress, args.warmup, args.lr)
            with _autocast(device):
                hs = head(emb.float(), (prev.float() + noise), args.train_depth)
            loss = reg = ce = 0.0
            for w, h in zip(weights, hs):
                lj, rj, cj = head_loss(h, f, mask, lm_w, args.ce_weight)
                loss, reg, ce = loss + w * lj, reg + w * rj, ce + w * cj
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), args.clip)
            opt.step()
            step += 1
            if step % args.log_every == 0 or step == 1 or step == total:
                log = {"step": step, "loss": loss.item(), "smooth_l1": float(reg), "ce": float(ce),
                       "lr": opt.param_groups[0]["lr"], "elapsed_s": round(time.time() - t0, 1)}
                print(f"  step {step}/{total}  loss {log['loss']:.4f}  l1 {log['smooth_l1']:.4f}  "
                      f"ce {log['ce']:.4f}  lr {log['lr']:.2e}  {log['elapsed_s']} s", flush=True)
        if time.time() - t0 > args.train_seconds:
            print(f"  stopped at the --train-seconds budget ({args.train_seconds} s)", flush=True)
            break
    head.eval()
    return {"steps": step, "steps_per_epoch": per_epoch, "train_s": round(time.time() - t0, 1),
            "feature_std": feat_std, "last": log}


@torch.no_grad()
def _argmax_rows(x: torch.Tensor, lm_w: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    out = [lm_logits(flat[i:i + chunk], lm_w).argmax(-1) for i in range(0, flat.shape[0], chunk)]
    return torch.cat(out).view(x.shape[:-1])


@torch.no_grad()
def evaluate(head, data, idx, lm_w, depth: int, batch_tokens: int, device, draft_ids=None) -> dict:
    """Teacher-forced top-1 agreement (head argmax == target argmax, all masked positions; the
    head's argmax over ``draft_ids`` [Vd] only when given, as the engine's FR-Spec drafter) and
    the greedy chain of ``depth`` drafts from every anchor of the greedy sequences (their
    tokens are the target's argmax, so an accepted draft is the next input): mean accepted
    drafts, and P(first j drafts all accepted) for j = 1..depth."""
    hits = total = anchors = 0
    accepted = torch.zeros(depth, dtype=torch.float64)
    draft_w = None if draft_ids is None else lm_w[draft_ids]
    for b in make_batches(data, idx, batch_tokens, None):
        ids, emb, prev, f, mask = data.batch(b)
        with _autocast(device):
            hs = head(emb.float(), prev.float(), depth)
        tgt = _argmax_rows(f, lm_w)
        if draft_ids is None:
            match = [_argmax_rows(h, lm_w) == tgt for h in hs]
        else:
            match = [draft_ids[_argmax_rows(h, draft_w)] == tgt for h in hs]
        hits += int(match[0][mask].sum())
        total += int(mask.sum())
        length = ids.shape[1]
        if length < depth + 1:
            continue
        n = length - depth + 1  # anchors a with a + depth - 1 < L
        ok = mask[:, :n] & mask[:, depth - 1:depth - 1 + n]
        ok &= torch.tensor([data.greedy[i] for i in b], device=ids.device).unsqueeze(1)
        for j in range(1, depth):  # the chain's next input x_{a+j} is the target's greedy token
            ok &= ids[:, j:j + n] == tgt[:, j - 1:j - 1 + n]
        run = torch.ones_like(ok)
        for j in range(depth):
            run = run & match[j][:, j:j + n]
            accepted[j] += float((run & ok).sum())
        anchors += int(ok.sum())
    rates = (accepted / max(anchors, 1)).tolist()
    return {"top1": hits / max(total, 1), "positions": total, "chain_depth": depth, "chain_anchors": anchors,
            "mean_accepted": sum(rates), "p_accept_first_j": [round(r, 4) for r in rates]}


# --- feature parity with HF transformers (CPU, fp32) ------------------------------------------------
@torch.no_grad()
def check_features(llm, texts: list[str]) -> dict:
    """Our model's forward output vs HF's ``hidden_states[-1]`` (fp32, dense weights from the
    same GGUF) for a few prompts: max abs difference, and whether HF's last hidden state is
    post-norm (equal to ``model.model(...).last_hidden_state``)."""
    from transformers import AutoModelForCausalLM
    from miniinfer.loader.embedded import embedded_model_path
    path = embedded_model_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    worst = worst_norm = 0.0
    post_norm = True
    for text in texts:
        ids = llm.get_tokenizer().encode(text)
        ours = target_features(llm.engine.runner, [ids], 4096)[0].float().cpu()
        out = hf(torch.tensor([ids]), output_hidden_states=True)
        last = out.hidden_states[-1][0]
        base = hf.model(torch.tensor([ids])).last_hidden_state[0]
        post_norm &= bool(torch.allclose(last, base, atol=1e-6))
        worst = max(worst, float((ours - last).abs().max()))
        worst_norm = max(worst_norm, float((ours - base).abs().max()))
    return {"max_abs_diff_vs_hidden_states_last": worst, "max_abs_diff_vs_last_hidden_state": worst_norm,
            "hf_hidden_states_last_is_post_norm": post_norm, "feature_abs_max": float(ours.abs().max())}


# --- main ---------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="head file (safetensors, fp16)")
    p.add_argument("--metrics", default=None, help="metrics JSON (default: --out with .json)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny CPU-sized run (20 prompts, 16 tokens, few steps)")
    p.add_argument("--check-features", action="store_true", help="also compare our features with HF's (CPU fp32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-prompts", type=int, default=8000, help="training prompts (incl. the --val-frac held out)")
    p.add_argument("--mix", default="generated=0.4,local_text=0.25,template=0.25,chat=0.1",
                   help="share of each prompt source (benchmarks/eagle_prompts.py)")
    p.add_argument("--writer-oversample", type=float, default=1.6,
                   help="first-pass writer requests per wanted generated prompt (some are filtered out)")
    p.add_argument("--writer-tokens", type=int, default=64, help="max tokens of a written prompt")
    p.add_argument("--writer-temperature", type=float, default=0.9, help="sampling temperature of the written prompts")
    p.add_argument("--chat-answer-tokens", type=int, default=160, help="max tokens of the first answer of a chat")
    p.add_argument("--local-max-chars", type=int, default=1500, help="cap of a local text excerpt")
    p.add_argument("--local-max-files", type=int, default=1500, help="local files read at most")
    p.add_argument("--system-frac", type=float, default=0.05, help="items given a system prompt")
    p.add_argument("--num-eval-prompts", type=int, default=32)
    p.add_argument("--val-frac", type=float, default=0.03, help="training-distribution prompts held out")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--max-steps", type=int, default=0, help="0: epochs × batches")
    p.add_argument("--train-seconds", type=float, default=120.0, help="stop training after this long")
    p.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--clip", type=float, default=0.5)
    p.add_argument("--noise", type=float, default=0.1, help="uniform noise amplitude, × the features' std")
    p.add_argument("--ce-weight", type=float, default=0.1)
    p.add_argument("--train-depth", type=int, default=2, help="draft steps trained (1: teacher-forced only)")
    p.add_argument("--depth-weight", type=float, default=0.5, help="loss weight of step j: this ** (j - 1)")
    p.add_argument("--eval-depth", type=int, default=4)
    p.add_argument("--draft-vocab-size", type=int, default=8192,
                   help="FR-Spec: the most frequent output tokens the drafter scores (0: all)")
    p.add_argument("--init", default="last-layer",
                   help="the head's start: last-layer (the target's last decoder layer), random, or a head file")
    p.add_argument("--ce-vocab", default="full", choices=["full", "draft"],
                   help="the CE term over the full vocabulary or the draft vocabulary (FR-Spec: what the drafter scores)")
    p.add_argument("--greedy-frac", type=float, default=0.5,
                   help="share of the training responses decoded greedily (the rest at temperature 0.7)")
    p.add_argument("--save-data", default=None, help="write the generated sequences here (JSON)")
    p.add_argument("--data-only", action="store_true", help="with --save-data: stop after writing the data")
    p.add_argument("--load-data", default=None, help="train on sequences a --save-data run wrote (no generation)")
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args(argv)
    if args.quick:
        args.num_prompts, args.num_eval_prompts, args.max_tokens = 16, 4, 16
        args.writer_tokens, args.chat_answer_tokens, args.local_max_files = 16, 12, 60
        args.epochs, args.max_steps, args.warmup, args.batch_tokens, args.log_every = 1, 4, 2, 1024, 1
        args.val_frac = 0.1
        args.eval_depth = min(args.eval_depth, 3)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.metrics = args.metrics or os.path.splitext(args.out)[0] + ".json"
    return args


def build_llm(args):
    from miniinfer import LLM
    if args.device == "cuda":
        return LLM(None, dtype="bfloat16", device="cuda", max_model_len=1024, max_num_seqs=args.max_num_seqs,
                   gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed, progress=False)
    # CPU: dense fp32 weights (no GGUF kernels / oneDNN packing), so the training code can read them
    return LLM(None, dtype="float32", device="cpu", max_model_len=512, max_num_seqs=32, kv_cache_memory_gb=0.25,
               cpu_gguf_kernels=False, cpu_packed_weights=False, seed=args.seed, progress=False)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    llm = build_llm(args)
    runner, cfg = llm.engine.runner, llm.engine.model_config
    model = runner.model
    print(f"[train_eagle] target loaded on {device} in {time.time() - t_start:.1f} s", flush=True)
    metrics: dict = {"args": vars(args)}
    if args.check_features:
        metrics["feature_parity"] = check_features(llm, ["Hello! What is 2 + 2?", load_eval_prompts()[0]])
        print(f"[train_eagle] feature parity: {metrics['feature_parity']}", flush=True)

    t = time.time()
    if args.load_data:
        items, seqs, n_prompts, data_stats = load_data(args.load_data)
        gen_s = 0.0
        print(f"[train_eagle] loaded {len(seqs)} sequences from {args.load_data}", flush=True)
    else:
        items, data_stats = build_items(llm, args, random.Random(args.seed))
        print(f"[train_eagle] {len(items)} training prompts in {time.time() - t:.1f} s: {data_stats}", flush=True)
        eval_prompts = [[{"role": "user", "content": p}] for p in load_eval_prompts()[:args.num_eval_prompts]]
        t = time.time()
        seqs = (generate(llm, [it["messages"] for it in items], args.max_tokens, args.seed, args.greedy_frac)
                + generate(llm, eval_prompts, args.max_tokens, args.seed, 1.0))  # the benchmark decodes greedily
        n_prompts, gen_s = len(items), time.time() - t
        if args.save_data:
            save_data(args.save_data, items, seqs, n_prompts, data_stats)
            if args.data_only:
                print(f"[train_eagle] wrote {args.save_data} ({time.time() - t_start:.1f} s)", flush=True)
                return {"data": data_stats}
    n_tok = sum(len(s[0]) for s in seqs)
    print(f"[train_eagle] {len(seqs)} responses ({n_tok} tokens), generated in {gen_s:.1f} s", flush=True)
    t = time.time()
    feats = target_features(runner, [s[0] for s in seqs], 32768)
    print(f"[train_eagle] features in {time.time() - t:.1f} s", flush=True)

    embed = model.embed_tokens.weight.detach()
    lm_w = model.lm_head.weight.detach() if isinstance(model.lm_head, nn.Linear) else embed
    data = Data(seqs, feats, embed)
    n_val = max(2, int(n_prompts * args.val_frac))
    train_idx, val_idx = list(range(n_prompts - n_val)), list(range(n_prompts - n_val, n_prompts))
    eval_idx = list(range(n_prompts, len(seqs)))
    data_stats["generation_s"] = round(gen_s, 1)
    data_stats["tokens"] = {"train": data.tokens(train_idx), "val": data.tokens(val_idx), "eval": data.tokens(eval_idx),
                            "response_train": sum(len(seqs[i][0]) - seqs[i][1] for i in train_idx)}
    data_stats["tokens_per_source"] = {k: sum(len(seqs[i][0]) for i in range(n_prompts) if items[i]["source"] == k)
                                       for k in sorted({it["source"] for it in items})}
    data_stats["val_per_source"] = {k: sum(items[i]["source"] == k for i in val_idx)
                                    for k in sorted({it["source"] for it in items})}
    metrics["data"] = data_stats

    draft_ids = None
    if args.draft_vocab_size:  # FR-Spec: the drafter's logits over the most frequent output tokens
        counts = collections.Counter(t for i in train_idx for t in seqs[i][0][seqs[i][1]:])
        top = counts.most_common(args.draft_vocab_size)
        metrics["draft_vocab"] = sorted(t for t, _ in top)
        metrics["draft_vocab_coverage"] = sum(c for _, c in top) / max(sum(counts.values()), 1)
        draft_ids = torch.tensor(metrics["draft_vocab"], dtype=torch.int64, device=device)

    head = TrainHead(cfg, max(len(s[0]) for s in seqs) + 1).to(device)
    if args.init == "last-layer":
        init_from_target(head, model)
    elif args.init != "random":
        load_head(head, args.init)
    ev = dict(depth=args.eval_depth, batch_tokens=args.batch_tokens, device=device, draft_ids=draft_ids)
    metrics["before"] = {"val": evaluate(head, data, val_idx, lm_w, **ev)}
    print(f"[train_eagle] before: {metrics['before']['val']}", flush=True)
    print(f"[train_eagle] training on {len(train_idx)} sequences, validating on {len(val_idx)} + "
          f"{len(eval_idx)} held-out prompts", flush=True)
    ce_w = lm_w[draft_ids] if args.ce_vocab == "draft" and draft_ids is not None else lm_w
    metrics["train"] = train(head, data, train_idx, ce_w, args, device)
    for name, idx in (("val", val_idx), ("eval_prompts", eval_idx)):
        metrics[name] = evaluate(head, data, idx, lm_w, **ev)
        print(f"[train_eagle] {name}: {metrics[name]}", flush=True)
    metrics["val_by_source"] = {}
    for src in sorted({items[i]["source"] for i in val_idx}):
        m = evaluate(head, data, [i for i in val_idx if items[i]["source"] == src], lm_w, **ev)
        metrics["val_by_source"][src] = {k: m[k] for k in ("top1", "positions", "mean_accepted")}
    print(f"[train_eagle] val by source: {metrics['val_by_source']}", flush=True)

    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(head.hf_state_dict(torch.float16), args.out, metadata={"format": "pt", "kind": "eagle_head"})
    metrics.update(data_sequences=len(seqs), data_tokens=n_tok, total_s=round(time.time() - t_start, 1),
                   device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", out=args.out)
    with open(args.metrics, "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"[train_eagle] wrote {args.out} and {args.metrics} ({metrics['total_s']} s total)", flush=True)
    return metrics


if __name__ == "__main__":
    main()
