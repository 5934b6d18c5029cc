"""The model runner's graph paths, exercised on CPU: ``capture_cuda_graphs`` off CUDA keeps
the same static buffers and padding but reruns the forward instead of a captured graph, so
the input copying and padding logic is checked here; the GPU suite checks the real graphs."""
from __future__ import annotations

from helpers import check_clean, random_prompts

from miniinfer import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12)


def test_graph_padding_paths_match_eager(tiny_llm):
    prompts = random_prompts(12, seed=21, min_len=3, max_len=90)
    eager = tiny_llm("qwen3", max_num_batched_tokens=48, max_model_len=256)
    want = [o.outputs[0].token_ids for o in eager.generate(prompts, GREEDY, use_tqdm=False)]
    want_alone = [eager.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in prompts[:3]]

    graphed = tiny_llm("qwen3", max_num_batched_tokens=48, max_model_len=256, max_num_seqs=20)
    runner = graphed.engine.runner
    runner.capture_cuda_graphs()
    graphs = runner.cuda_graphs
    assert sorted(graphs.decode) == [1, 2, 4, 8, 16, 20]
    assert sorted(graphs.prefill) == [16, 32, 64, 128]
    used = {"decode": 0, "prefill": 0}
    for name, attr in (("decode", "replay_decode"), ("prefill", "replay_prefill")):
        orig = getattr(graphs, attr)

        def counted(*a, _orig=orig, _name=name):
            used[_name] += 1
            return _orig(*a)
        setattr(graphs, attr, counted)

    got = [o.outputs[0].token_ids for o in graphed.generate(prompts, GREEDY, use_tqdm=False)]
    assert got == want
    # one request at a time: its prefill (n <= 128 tokens) takes a prefill graph
    alone = [graphed.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in prompts[:3]]
    assert alone == want_alone
    assert used["decode"] > 0 and used["prefill"] >= 3
    check_clean(graphed)


def test_verify_takes_the_prefill_graph_with_several_logit_rows(tiny_llm):
    """A batch-1 speculative verify (1 + k rows of logits) replays a prefill graph."""
    prompts = [[5, 6, 7, 8, 9] * 6, [11, 12, 13] * 9]  # repetitive: n-gram drafts are plentiful
    params = SamplingParams(temperature=0, max_tokens=24)
    eager = tiny_llm("qwen3", max_model_len=256)
    want = [eager.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    spec = tiny_llm("qwen3", max_model_len=256, speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    spec.engine.runner.capture_cuda_graphs()
    graphs = spec.engine.runner.cuda_graphs
    rows = []
    orig = graphs.replay_prefill

    def counted(batch):
        rows.append(batch.logits_indices.shape[0])
        return orig(batch)
    graphs.replay_prefill = counted
    got = [spec.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert got == want
    assert max(rows) > 1 and spec.engine.stats()["spec_num_draft_tokens"] > 0
    check_clean(spec)


def test_verify_of_several_sequences_takes_a_verify_graph(tiny_llm):
    """With speculation, a verify of 2 … 32 sequences replays a verify graph (sequences and
    tokens padded to the bucket) and gives the eager engine's greedy output."""
    prompts = [[5, 6, 7, 8, 9] * 6, [11, 12, 13] * 9, [21, 22] * 12]  # repetitive: n-gram drafts
    params = SamplingParams(temperature=0, max_tokens=24)
    eager = tiny_llm("qwen3", max_model_len=256)
    want = [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]
    spec = tiny_llm("qwen3", max_model_len=256, max_num_seqs=8,
                    speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    spec.engine.runner.capture_cuda_graphs()
    graphs = spec.engine.runner.cuda_graphs
    assert graphs.verify_rows == 5 and sorted(graphs.verify) == [2, 4, 8]
    seqs = []
    orig = graphs.replay_verify

    def counted(batch):
        seqs.append(batch.attn_metadata.num_seqs)
        return orig(batch)
    graphs.replay_verify = counted
    got = [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert 3 in seqs  # three sequences in the bucket of 4: one padding sequence
    check_clean(spec)


def test_position_seeds_of_verify_rows():
    """A seeded request's verify rows draw with the seed of the position they sample for: the
    root at ``start`` for ``start + 1``, a depth-d node for ``start + d + 1``, and a sampling
    prefill chunk of n tokens riding in the verify step for ``start + n``."""
    from miniinfer.engine.sequence import Sequence
    from miniinfer.engine.step import ScheduledSeq
    from miniinfer.spec_decode.rejection_sampler import position_seeds as _position_seeds
    seeded = Sequence("a", 0, list(range(20)), 20, SamplingParams(seed=7))
    seeded.num_computed_tokens = 19
    verify = ScheduledSeq(seeded, 3, 19, [5, 6], [-1, 0])  # root at 19, drafts at depths 1 and 2
    chunk_seq = Sequence("b", 0, list(range(12)), 12, SamplingParams(seed=7))
    chunk = ScheduledSeq(chunk_seq, 8, 4)  # the prompt's last 8 tokens: samples position 12
    plain = ScheduledSeq(Sequence("c", 0, [1, 2], 2, SamplingParams()), 1, 1)
    base = 7 * 1_000_003
    assert _position_seeds([verify, chunk, plain], [[-1, 0], [], []]) == [
        base + 20, base + 21, base + 22, base + 12, None]
    assert _position_seeds([plain], [[]]) is None


def test_verify_graph_rows_cover_chain_drafters(tiny_llm):
    """n-gram drafts num_speculative_tokens whatever num_draft_tokens says: the verify graphs
    hold 1 + k rows per sequence, so its verifies replay them."""
    spec = tiny_llm("qwen3", max_model_len=256, max_num_seqs=4,
                    speculative_config={"method": "ngram", "num_speculative_tokens": 4, "num_draft_tokens": 2})
    spec.engine.runner.capture_cuda_graphs()
    assert spec.engine.runner.cuda_graphs.verify_rows == 5
