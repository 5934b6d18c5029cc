"""Multi-node tensor parallelism through torchrun (distributed_executor_backend=external_launcher),
shown on one host as two "nodes" of one process each (gloo on CPU): the ranks rendezvous at
the master address, rank 0 runs the engine, rank 1 serves it; greedy outputs equal TP=1."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

from helpers import random_prompts

SCRIPT = textwrap.dedent("""
    import json, sys
    from miniinfer import LLM, SamplingParams
    folder, prompts = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(folder, load_format="dummy", device="cpu", dtype="float32", num_kv_blocks=64, progress=False,
              tensor_parallel_size=2, distributed_executor_backend="external_launcher")
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    print("RESULT " + json.dumps([o.outputs[0].token_ids for o in outs]), flush=True)
    llm.engine.shutdown()
""")


def _config(folder) -> str:
    cfg = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=600, hidden_size=48,
               intermediate_size=96, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
               rms_norm_eps=1e-6, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True,
               eos_token_id=3)
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


def test_two_node_torchrun_equals_one_rank(tmp_path):
    from miniinfer import LLM, SamplingParams
    folder = _config(tmp_path)
    prompts = random_prompts(4, seed=3, min_len=3, max_len=30, vocab=600)
    want = [o.outputs[0].token_ids for o in LLM(folder, load_format="dummy", device="cpu", dtype="float32",
                                                 num_kv_blocks=64, progress=False).generate(
        prompts, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)]
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    codes, logs = _launch(script, folder, prompts)
    if codes != [0, 0] and any("DistNetworkError" in log for log in logs) and "RESULT " in logs[0]:
        # Seen twice on a loaded 2-core machine, never reproduced alone: a node's exit failed on
        # a closed store connection after the run had finished. Once more, then it counts.
        codes, logs = _launch(script, folder, prompts)
    assert codes == [0, 0]
    line = next(ln for ln in logs[0].splitlines() if ln.startswith("RESULT "))
    assert json.loads(line.removeprefix("RESULT ")) == want
    assert "RESULT" not in logs[1]  # rank 1 served rank 0 and never returned from LLM()


def _launch(script, folder: str, prompts) -> tuple[list[int], list[str]]:
    """Two torchrun "nodes" of one process each on 127.0.0.1: (exit codes, outputs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={r}",
         "--master-addr=127.0.0.1", f"--master-port={port}", str(script), folder, json.dumps(prompts)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for r in (0, 1)]
    try:
        logs = [n.communicate(timeout=240)[0] for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    for r, log in enumerate(logs):
        print(f"--- node {r} (exit {nodes[r].returncode}) ---\n{log}")  # shown on failure
    return [n.returncode for n in nodes], logs
