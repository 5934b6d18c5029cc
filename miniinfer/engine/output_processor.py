"""Output processing: a finished step's sampled ids become text and ``RequestOutput``s.

For each sequence that sampled, in scheduled order: resolve its placeholder (overlap) with
the real token, record logprobs, advance the detokenizer, and decide whether it stops
(``check_stop``: the one place that sets ``finish_reason`` / ``stop_reason`` and the final
text). A finished sequence is released through the scheduler. This is where a grammar
matcher advances by the committed token (or, with deferred sampling, where the outcome of the
grammar thread's advance is applied), and where speculative acceptance commits several tokens
at once.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from miniinfer.engine.scheduler import Scheduler
from miniinfer.engine.sequence import Sequence
from miniinfer.engine.step import ScheduledSeq, SchedulerOutput, StepResult
from miniinfer.outputs import CompletionOutput, Logprob, RequestOutput
from miniinfer.sampling_params import SamplingParams

log = logging.getLogger("miniinfer")


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool = True  # False: reported only once it has finished
    seqs: list[Sequence] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int, scheduler: Scheduler,
                 requests: dict[str, Request], speculative: bool = False):
        self.tokenizer = tokenizer
        self.speculative = speculative  # RequestOutput.metrics carry the spec_* keys (zero without drafts)
        self.requests = requests  # the engine's, by id
        self._token_bytes = None
        if tokenizer is not None:
            from miniinfer.tokenizer import TokenBytes
            self._token_bytes = TokenBytes(tokenizer)
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.scheduler = scheduler
        self.generation_tokens_total = 0

    def process(self, sched: SchedulerOutput, result: StepResult, grammar_job=None) -> list[RequestOutput]:
        """Apply a step's sampled ids; returns the outputs due (streaming requests that moved,
        and every request that finished). ``grammar_job``: a ``GrammarStepJob`` that has
        advanced the matchers of the sequences it names by these tokens already; its outcomes
        (a rejected token fails the request, a completed grammar stops it) are applied where
        the matcher would have moved."""
        now = time.monotonic()
        touched: set[str] = set()
        row = 0
        for s in sched.scheduled:
            seq = s.seq
            touched.add(seq.request_id)
            if not s.samples:
                if not seq.is_finished:
                    self.scheduler.publish(seq)
                continue
            token = result.token_ids[row]
            row += 1
            if seq.is_finished:  # stopped or aborted while this step ran: drop the token
                continue
            try:
                if result.spec_token_ids is None:
                    self._commit(seq, token, result, row - 1, now, grammar_job)
                else:
                    self._commit_verified(s, result.spec_token_ids[row - 1], result.spec_paths[row - 1], result,
                                          result.logits_rows[row - 1], now)
            except Exception as e:  # noqa: BLE001 - one request's failure must not stop the others
                log.exception("request %s failed while processing its output", seq.request_id)
                self.fail(seq, f"{type(e).__name__}: {e}")
        outputs = []
        for rid in touched:
            req = self.requests.get(rid)
            if req is not None and (req.stream or req.finished):
                outputs.append(make_output(req, self.speculative))
        return outputs

    def _commit_verified(self, s: ScheduledSeq, tokens: list[int], path: list[int], result: StepResult,
                         row: int, now: float) -> None:
        """A speculative verify's outcome: the accepted drafts and the new token, one by one
        (a stop mid-draft drops the rest); committed token j was drawn at logits row ``row +
        path[j]`` (a tree's accepted path skips rows). The K/V of rejected drafts is given up
        first, so no page holding it is ever published; their slots are overwritten by later
        tokens. A sequence without drafts in the step (a decode, or a prefill chunk that
        samples) keeps what the scheduler counted."""
        if s.draft_token_ids:
            s.seq.num_computed_tokens = s.start + len(tokens)  # the last token and the accepted drafts
        for j, token in enumerate(tokens):
            self._commit(s.seq, token, result, row + path[j], now)
            if s.seq.is_finished:
                break

    def _commit(self, seq: Sequence, token: int, result: StepResult, row: int, now: float,
                grammar_job=None) -> None:
        """One committed token: logprobs, the placeholder resolved, text, stop checks.
        ``grammar_job``: see ``process``."""
        if seq.logprobs is not None:
            seq.logprobs.append(self._logprob_entry(result, row, token, seq.params.logprobs))
        if seq.num_pending:
            seq.resolve_pending(token)
        else:  # the second and later tokens of a speculative verify
            seq.token_ids.append(token)
        self.generation_tokens_total += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        grammar = None
        if seq.grammar is not None:
            grammar = _advance_grammar(seq, token, grammar_job.outcome(seq) if grammar_job is not None else None)
        if grammar is not None and grammar.error is not None:
            raise RuntimeError(grammar.error)
        self.check_stop(seq, token)
        if grammar is not None and grammar.terminated and not seq.is_finished:
            self.finish(seq, "stop")  # the grammar is complete: nothing more may follow
        if seq.is_finished:
            seq.finished_time = now
        else:
            self.scheduler.publish(seq)

    def fail(self, seq: Sequence, error: str) -> None:
        """Fail one sequence (finish reason ``error``) and every sibling of its request: the
        request ends with ``RequestOutput.error`` set; the engine and other requests go on."""
        req = self.requests.get(seq.request_id)
        for s in req.seqs if req is not None else [seq]:
            if not s.is_finished:
                s.error = error
                self.finish(s, "error")
                s.finished_time = time.monotonic()

    def _logprob_entry(self, result: StepResult, row: int, token: int, top_n: int) -> dict[int, Logprob]:
        """The sampled token and the top-N, keyed by token id (no candidate is ever lost)."""
        out = result.sampler_output
        entry: dict[int, Logprob] = {}
        ids = out.top_ids[row, :top_n].tolist()
        vals = out.top_logprobs[row, :top_n].tolist()
        for rank, (t, v) in enumerate(zip(ids, vals), start=1):
            entry[t] = self._logprob(t, v, rank)
        if token not in entry:
            entry[token] = self._logprob(token, float(out.sampled_logprob[row]), int(out.sampled_rank[row]))
        return entry

    def _logprob(self, token: int, value: float, rank: int) -> Logprob:
        if self.tokenizer is None:
            return Logprob(value, rank)
        return Logprob(value, rank, self.tokenizer.decode([token]), self._token_bytes(token))

    def check_stop(self, seq: Sequence, token: int) -> None:
        """Every finish path but abort and error: EOS / stop token id, stop string, length.

        No stop condition of any kind applies before ``min_tokens`` tokens exist (vLLM). The
        text of a token that ended the request by EOS or ``stop_token_ids`` is not part of the
        output text unless ``include_stop_str_in_output``; its id stays in the token ids."""
        p = seq.params
        past_min = seq.num_output_tokens >= p.min_tokens
        reason = stop = None
        if past_min:
            if not p.ignore_eos and token in self.eos_token_ids:
                reason, stop = "stop", None
            elif token in p.stop_token_ids:
                reason, stop = "stop", token
        detok = seq.detokenizer
        if reason is not None and not p.include_stop_str_in_output:
            self.finish(seq, reason, stop)
            return
        new_text = detok.push([token]) if detok is not None else ""
        text = detok.text if detok is not None else ""
        if reason is None and past_min and seq.stop_checker is not None and new_text:
            matched, cut = seq.stop_checker.check(text, len(new_text))
            if matched is not None:
                seq.output_text = text[:cut]
                self.finish(seq, "stop", matched, text_final=True)
                return
        if reason is None and p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            reason = "length"
        if reason is None and seq.num_tokens - seq.num_pending >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self.finish(seq, reason, stop)
        elif seq.stop_checker is not None:
            seq.output_text = text[:seq.stop_checker.streamable_len(text)]
        else:
            seq.output_text = text

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None,
               text_final: bool = False) -> None:
        """The one place a sequence finishes (stop, length, abort, error): its final text
        (held-back text flushed, an incomplete trailing character dropped) and its release."""
        if seq.is_finished:
            return
        if not text_final and seq.detokenizer is not None and reason not in ("abort", "error"):
            seq.detokenizer.finish(drop_incomplete=True)
            seq.output_text = seq.detokenizer.text
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)


@dataclass
class GrammarOutcome:
    error: str | None = None  # the matcher rejected a token (the mask should have prevented it)
    terminated: bool = False  # the grammar is complete: the sequence stops


def _advance_grammar(seq: Sequence, token: int, moved: tuple[bool, bool] | None = None) -> GrammarOutcome:
    """Feed a committed token to the sequence's matcher (the one place a matcher moves, unless
    ``moved``: (accepted, terminated) when deferred sampling's grammar job advanced it already);
    a dormant grammar (reasoning) wakes after the token that completes the end marker and
    constrains from the next one."""
    if seq.reasoning_end is None:
        if moved is None:
            accepted = seq.grammar.accept_token(token)
            moved = accepted, accepted and seq.grammar.is_terminated()
        if not moved[0]:
            return GrammarOutcome(f"the grammar rejected token {token}, which the mask should have forbidden")
        return _TERMINATED if moved[1] else _ADVANCED
    end = len(seq.token_ids) - seq.num_pending  # the committed tokens, this one included, end here
    if seq.token_ids[end - len(seq.reasoning_end):end] == seq.reasoning_end:
        seq.reasoning_end = None
    return _ADVANCED


_ADVANCED = GrammarOutcome()  # shared, never mutated: no allocation per row and step
_TERMINATED = GrammarOutcome(terminated=True)


def make_output(req: Request, speculative: bool = False) -> RequestOutput:
    """The request's cumulative output (vLLM's ``RequestOutput``); with ``speculative`` (or
    drafts verified) its metrics carry the speculation counters and times."""
    seqs = req.seqs
    comps = [CompletionOutput(s.index, s.output_text, s.output_token_ids, s.finish_reason, s.stop_reason,
                              s.logprobs) for s in seqs]
    first = [s.first_token_time for s in seqs if s.first_token_time is not None]
    done = [s.finished_time for s in seqs if s.finished_time is not None]
    metrics = {
        "arrival_time": seqs[0].arrival_time,
        "first_token_time": min(first) if first else None,
        "finished_time": max(done) if req.finished and done else None,
        "num_generated_tokens": sum(s.num_output_tokens for s in seqs),
    }
    drafted = sum(s.num_draft_tokens for s in seqs)
    if drafted or speculative:  # speculative decoding
        metrics["spec_num_draft_tokens"] = drafted
        metrics["spec_num_accepted_tokens"] = sum(s.num_accepted_tokens for s in seqs)
        metrics["spec_draft_time_s"] = sum(s.spec_draft_time_s for s in seqs)
        metrics["spec_verify_time_s"] = sum(s.spec_verify_time_s for s in seqs)
    error = next((s.error for s in seqs if s.error is not None), None)
    return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, comps, req.finished,
                         num_cached_tokens=seqs[0].num_cached_tokens, metrics=metrics, error=error)
