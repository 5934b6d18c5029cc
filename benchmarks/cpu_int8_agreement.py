"""int8 activations (``cpu_int8_activations=True``, llama.cpp's numerics) against the default
fp32-activation CPU path on the embedded SmolLM2-135M-Instruct Q4_1 GGUF (issue #17).

    python benchmarks/cpu_int8_agreement.py [--isa avx512 avx2] [--threads 2] [--json out.json]

One fresh process per ISA (``MINIINFER_CPU_ISA``, ``OMP_NUM_THREADS`` and ``torch.set_num_threads``
= T), one engine in it; the two numerics are switched on the same loaded weights with
``use_int8_activations(model, 2 / 1 / None)``:

* ``int8`` — Q4_1 GEMMs of >= 2 rows take int8 activations, batch-1 GEMVs stay fp32 (the option
  as shipped until ``INT8_MIN_ROWS`` became 1);
* ``int8_all`` — every Q4_1 call int8 (``min_rows=1``), as llama.cpp does: the option as shipped.

Greedy agreement: the first 8 §8 chat prompts (``CPU_QUESTIONS``), ``max_tokens=64,
ignore_eos=True``, temperature 0, prefix caching off, ``b8``: all 8 in one ``generate`` (every
decode step 8 rows: int8 and int8_all run the same numerics), ``b1``: one ``generate`` per prompt
(batch-1 decode: fp32 under ``int8``, int8 under ``int8_all``); ``agree_tokens`` = fraction of
the 8 x 64 positions with the same token as the fp32 run, ``agree_prefix`` = mean length of the
identical leading run / 64, ``identical_seqs`` = sequences identical throughout.
Logit error: ``forward_logits`` (every position of one prompt) of 4 chat prompts: max and mean
|int8 - fp32|, the relative Frobenius error, top-1 agreement over all positions, and the
largest |logit| for scale. Metric names ``{agree_tokens,...}_{b8,b1}_{variant}_{isa}_t{T}`` and
``logit_..._{variant}_{isa}_t{T}``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys


def device() -> str:
    from miniinfer.bench.common import cpu_device_description
    return cpu_device_description()


def _worker(threads: int) -> dict:
    import torch

    from miniinfer import LLM, SamplingParams
    from miniinfer.bench.offline import CPU_QUESTIONS
    from miniinfer.kernels import cpu_kernels
    from miniinfer.models.packed_linear import use_int8_activations

    torch.set_num_threads(threads)
    llm = LLM(None, dtype="float32", progress=False, enable_prefix_caching=False)
    model = llm.engine.runner.model
    prompts = [llm.engine.apply_chat_template([{"role": "user", "content": q}]) for q in CPU_QUESTIONS[:8]]
    sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    tok = llm.get_tokenizer()
    logit_ids = [tok.encode(p, add_special_tokens=False) for p in prompts[:4]]

    def run(min_rows):
        use_int8_activations(model, min_rows)
        gen = {"b8": [list(r.outputs[0].token_ids) for r in llm.generate(prompts, sp, use_tqdm=False)],
               "b1": [list(llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids) for p in prompts]}
        logits = [llm.engine.runner.forward_logits(ids) for ids in logit_ids]
        return gen, logits

    ref_gen, ref_logits = run(None)
    res = {"isa": cpu_kernels.isa(), "int8_kernel": cpu_kernels.int8_kernel(), "torch_threads": torch.get_num_threads(),
           "logit_prompt_tokens": [len(i) for i in logit_ids]}
    for name, min_rows in (("int8", 2), ("int8_all", 1)):
        gens, logits = run(min_rows)
        out = {}
        for mode, gen in gens.items():
            ref = ref_gen[mode]
            same = sum(a == b for g, r in zip(gen, ref) for a, b in zip(g, r))
            prefix = [next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), len(r)) for g, r in zip(gen, ref)]
            out.update({f"agree_tokens_{mode}": same / sum(len(r) for r in ref),
                        f"agree_prefix_{mode}": sum(prefix) / (64 * len(gen)),
                        f"identical_seqs_{mode}": sum(g == r for g, r in zip(gen, ref)),
                        f"first_divergence_{mode}": prefix})
        d = torch.cat([(a - b).abs().flatten() for a, b in zip(logits, ref_logits)])
        num = sum(((a - b) ** 2).sum() for a, b in zip(logits, ref_logits)) ** 0.5
        den = sum((b ** 2).sum() for b in ref_logits) ** 0.5
        top1 = torch.cat([a.argmax(-1) == b.argmax(-1) for a, b in zip(logits, ref_logits)]).float().mean()
        res[name] = {**out, "logit_max_abs_diff": d.max().item(), "logit_mean_abs_diff": d.mean().item(),
                     "logit_rel_fro_err": (num / den).item(), "logit_top1_agree": top1.item(),
                     "logit_max_abs": max(b.abs().max().item() for b in ref_logits)}
    res["fp32_b8_equals_b1"] = ref_gen["b8"] == ref_gen["b1"]
    use_int8_activations(model, None)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--isa", nargs="+", default=["avx512", "avx2"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write {device, date, command, metrics} here")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(_worker(a.worker)))
        return
    m, details = {}, {}
    for isa in a.isa:
        env = {**os.environ, "MINIINFER_CPU_ISA": isa, "OMP_NUM_THREADS": str(a.threads)}
        out = subprocess.run([sys.executable, __file__, "--worker", str(a.threads)], env=env, check=True,
                             capture_output=True, text=True).stdout
        res = json.loads(out.strip().splitlines()[-1])
        if res["isa"] != isa:
            raise RuntimeError(f"asked for the {isa} path, ran {res['isa']}")
        details[f"{isa}_t{a.threads}"] = res
        for variant in ("int8", "int8_all"):
            for k, v in res[variant].items():
                if isinstance(v, (int, float)):
                    # agree_tokens_b8 -> agree_tokens_b8_int8_avx512_t2 (same as logit_* keys)
                    m[f"{k}_{variant}_{isa}_t{a.threads}"] = v
    for k, v in m.items():
        print(f"{k:50s} {v:9.4f}")
    if a.json:
        result = {"device": device(), "date": datetime.date.today().isoformat(),
                  "command": "python benchmarks/cpu_int8_agreement.py " + " ".join(sys.argv[1:]),
                  "metrics": m, "details": details}
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
