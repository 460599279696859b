"""A conversation with a sorted model: prompt reuse across turns, and the generation loop of all modes.

Every mode works on one `LayeredState`. Fixed depth runs each token through layers 1..k. Auto mode
runs on exit by exit and stops at the first confident one, never recomputing a layer. With `Mode.kv`
"propagate", the layers a token skipped get its K/V right after it (`LayeredState.propagate`). Speculative
mode drafts at depth k; verifying is running the last draft to full depth, which drains the drafted
positions waiting at layer k+1 in one batched pass; a rejection is a crop. The mode is read before
every token, so a front end can change it mid-answer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator

import torch

from sortedchat import SortedChatError
from sortedchat.engine.confidence import make_measure
from sortedchat.engine.events import GenerationStats, TokenEvent
from sortedchat.engine.modes import Mode
from sortedchat.engine.pacing import Pacer
from sortedchat.engine.sampling import Sampler, SamplingConfig
from sortedchat.engine.state import LayeredState
from sortedchat.engine.text import IncrementalText
from sortedchat.sorted_model import SortedModel

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
MAX_DRAFT = 16


def stop_token_ids(sm: SortedModel) -> set[int]:
    tok = sm.tokenizer
    ids: set[int] = set()
    for source in (tok.eos_token_id, getattr(sm.model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    vocab = tok.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return ids


def encode_chat(sm: SortedModel, messages: list[dict]) -> list[int]:
    """Token ids of the conversation, ending with the assistant's generation prompt."""
    tok = sm.tokenizer
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tok(text, add_special_tokens=False)["input_ids"]


class ChatSession:
    """Owns the layered KV state of one conversation. Not thread-safe: one generation at a time."""

    def __init__(self, sm: SortedModel, mode: Mode | None = None):
        self.sm = sm
        self.L = sm.num_layers
        self.state = LayeredState(sm)
        self.mode = (mode or Mode.fixed()).validate(self.L)
        self.stop_ids = stop_token_ids(sm)
        self.draft_len = self.mode.draft_len
        self.last_stats: GenerationStats | None = None
        self._measures: dict[str, object] = {}
        self.pacer = Pacer()  # kept across answers for one draft depth and length (see `_generate`)

    # -- public API --------------------------------------------------------------------------------
    def generate(
        self, messages: list[dict], sampling: SamplingConfig | None = None, should_stop: Callable[[], bool] | None = None
    ) -> Iterator[TokenEvent]:
        """Answer the last message of `messages` (a chat-template conversation)."""
        return self.generate_ids(encode_chat(self.sm, messages), sampling, should_stop)

    def generate_ids(
        self,
        prompt: list[int],
        sampling: SamplingConfig | None = None,
        should_stop: Callable[[], bool] | None = None,
        forced: list[int] | None = None,
    ) -> Iterator[TokenEvent]:
        """Answer `prompt` (token ids). With `forced` (teacher forcing, for measuring a mode's per-token
        quality), each step still reports the token the mode chose, but the next step is fed `forced[i]`
        instead; the answer is then `len(forced)` tokens long. Speculative mode has no per-token choice
        to measure this way."""
        sampling = (sampling or SamplingConfig()).validate()
        limit = self.sm.max_positions
        if not prompt:
            raise SortedChatError("the prompt is empty")
        if limit and len(prompt) >= limit:
            raise SortedChatError(f"the prompt is {len(prompt)} tokens; the model's context holds {limit}")
        if forced is not None:
            if self.mode.kind == "speculative":
                raise SortedChatError("teacher forcing measures fixed-depth or auto mode, not speculative")
            sampling = dataclasses.replace(sampling, max_new_tokens=len(forced))
        return self._generate(prompt, sampling, should_stop or (lambda: False), forced)

    def reset(self) -> None:
        """Forget the conversation (a new chat)."""
        self.state.reset()

    # -- the loop ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def _generate(self, prompt: list[int], sampling: SamplingConfig, should_stop, forced=None) -> Iterator[TokenEvent]:
        state, L = self.state, self.L
        sampler = Sampler(sampling, self.sm.device)
        text = IncrementalText(self.sm.tokenizer, self.stop_ids)
        stats = GenerationStats(num_layers=L, prompt_tokens=len(prompt))
        self.last_stats = stats
        t0 = time.perf_counter()

        # Reuse the K/V of the longest common prefix; the last prompt token is always fed anew.
        common = 0
        for a, b in zip(state.tokens, prompt[:-1]):
            if a != b:
                break
            common += 1
        state.crop(common)
        stats.reused_tokens = common
        mode = self.mode.validate(L)
        if len(prompt) - 1 > common:
            state.run((mode.depth or L) if mode.kind == "depth" else L, prompt[common:-1])
        if mode.kv == "propagate":
            state.propagate()  # the prompt at a fixed depth, or a backlog left by earlier exact tokens
        t1 = time.perf_counter()
        stats.prefill_seconds = t1 - t0
        evals0, fills0 = state.layer_evals, state.kv_fills
        stats.kv_fill_share = state.kv_fill_share
        pending, emitted = prompt[-1], 0
        limit = self.sm.max_positions or 1 << 62

        while emitted < sampling.max_new_tokens:
            if should_stop():
                stats.stopped = "interrupted"
                break
            if state.length + 1 >= limit:
                stats.stopped = "context"
                break
            mode = self.mode.validate(L)
            budget = sampling.max_new_tokens - emitted
            if mode.kind == "speculative" and (mode.depth, mode.draft_len) != self.pacer.drafting:
                self.pacer = Pacer(drafting=(mode.depth, mode.draft_len))  # another draft: measure it afresh
            drafting = (
                mode.kind == "speculative" and budget > 1 and forced is None and (self.pacer.draft_now() or not mode.pace)
            )
            step_start = time.perf_counter()
            if drafting:
                produced = self._speculative_round(pending, mode, sampler, min(budget, limit - state.length - 1), stats)
                self.pacer.record_draft(time.perf_counter() - step_start, len(produced))
            elif mode.kind == "auto":
                produced = [self._auto_step(pending, mode, sampler, stats)]
            else:
                depth = L if mode.kind == "speculative" else (mode.depth or L)  # paced, forced or last token: full
                logits = self.sm.head(state.run(depth, [pending])[:, -1], depth, sampler.cfg.greedy)[0]
                produced = [(*sampler.pick(logits), depth, False, None)]
                if mode.kind == "speculative" and budget > 1:
                    self.pacer.record_full(time.perf_counter() - step_start)
                    stats.paced += 1
            if mode.kv == "propagate":
                state.propagate()  # the layers this token skipped get its K/V now: nothing waits
            done = False
            for token, conf, exit_layer, drafted, accepted in produced:
                is_stop = token in self.stop_ids
                stats.tokens += 1
                stats.exit_sum += exit_layer
                stats.exit_counts[exit_layer] = stats.exit_counts.get(exit_layer, 0) + 1
                stats.layer_evals = state.layer_evals - evals0
                stats.kv_fills = state.kv_fills - fills0
                stats.decode_seconds = time.perf_counter() - t1
                yield TokenEvent(
                    index=emitted,
                    token_id=token,
                    text=text.push(token),
                    exit_layer=exit_layer,
                    confidence=conf,
                    elapsed=time.perf_counter() - t0,
                    drafted=drafted,
                    accepted=accepted,
                    is_stop=is_stop,
                )
                pending = token if forced is None else forced[emitted]
                emitted += 1
                if is_stop and forced is None:
                    stats.stopped = "eos"
                    done = True
                    break
            if done:
                break
        else:
            stats.stopped = "max_tokens"
        stats.layer_evals = state.layer_evals - evals0
        stats.kv_fills = state.kv_fills - fills0
        stats.decode_seconds = time.perf_counter() - t1

    def _measure(self, mode: Mode):
        name = mode.confidence or self.sm.config.confidence
        if name not in self._measures:
            self._measures[name] = make_measure(name, self.sm)
        return self._measures[name]

    def _auto_step(self, token: int, mode: Mode, sampler: Sampler, stats: GenerationStats):
        """Run exit by exit; leave at the first exit whose confidence reaches its threshold.

        An exit whose threshold is 1 or more is not checked (calibration marks exits that never pay off
        that way). The measure's per-token work (`prepare`, `observe`) counts as check time."""
        thresholds = self.sm.thresholds(mode.threshold, mode.shift)
        measure = self._measure(mode)
        out = self.state.run(self.sm.exits[0], [token])
        t = time.perf_counter()
        measure.prepare(self.state.tokens)
        stats.check_seconds += time.perf_counter() - t
        for e in self.sm.exits:
            if out is None:
                out = self.state.run(e)
            h = out[:, -1]
            measure.reached(h, e)
            if e == self.L:
                logits = self.sm.head(h, e, sampler.cfg.greedy)
                break
            if thresholds[e] >= 1.0:
                out = None
                continue
            t = time.perf_counter()
            conf, logits = measure(h, e)
            stats.check_seconds += time.perf_counter() - t
            stats.checks += 1
            if conf >= thresholds[e]:
                if logits is None:
                    logits = self.sm.head(h, e, sampler.cfg.greedy)
                break
            out = None
        token_out, p = sampler.pick(logits[0])
        t = time.perf_counter()
        measure.observe(token_out, logits[0])
        stats.check_seconds += time.perf_counter() - t
        return (token_out, p, e, False, None)

    def _speculative_round(self, pending: int, mode: Mode, sampler: Sampler, budget: int, stats: GenerationStats):
        """Draft up to n tokens at depth k, verify them in one pass of layers k+1..L, crop what fails."""
        state, L, k = self.state, self.L, mode.depth or self.sm.default_draft_exit
        start = state.length  # position of `pending`
        n = max(1, min(self.draft_len, budget - 1, MAX_DRAFT))
        drafts, draft_conf, draft_probs = [], [], []
        feed = pending
        for _ in range(n):
            logits = self.sm.head(state.run(k, [feed])[:, -1], k, sampler.cfg.greedy)[0]
            if sampler.cfg.greedy:
                token, conf = sampler.pick(logits)
            else:
                probs = sampler.distribution(logits[None])[0]
                token = sampler.draw(probs)
                conf = float(probs[token])
                draft_probs.append(probs)
            drafts.append(token)
            draft_conf.append(conf)
            feed = token
            if token in self.stop_ids or conf < mode.draft_stop:
                break
        n = len(drafts)
        # Verification: the last draft runs to full depth, draining the drafted positions at k+1..L.
        out = state.run(L, [drafts[-1]])
        full_logits = self.sm.head(out[:, -(n + 1) :], L)[0]  # predictions for positions start+1 .. start+n+1
        stats.drafted += n
        stats.verifications += 1

        produced = []
        if sampler.cfg.greedy:
            full = torch.softmax(full_logits.float(), dim=-1)
            conf_full, pred = full.max(dim=-1)
            pred, conf_full = pred.tolist(), conf_full.tolist()
            m = 0
            while m < n and drafts[m] == pred[m]:
                m += 1
            produced = [(drafts[i], draft_conf[i], k, True, True) for i in range(m)]
            final = (pred[m], conf_full[m], L, False, None)
        else:
            target = sampler.distribution(full_logits)
            m, final = 0, None
            while m < n:
                d, q, p = drafts[m], draft_probs[m], target[m]
                if sampler.uniform() < min(1.0, float(p[d]) / max(float(q[d]), 1e-20)):
                    m += 1
                    continue
                residual = torch.clamp(p - q, min=0)
                residual = residual / residual.sum() if residual.sum() > 0 else p
                token = sampler.draw(residual)
                final = (token, float(p[token]), L, False, None)
                break
            produced = [(drafts[i], draft_conf[i], k, True, True) for i in range(m)]
            if final is None:
                token = sampler.draw(target[n])
                final = (token, float(target[n][token]), L, False, None)
        stats.accepted += m
        if m < n:
            state.crop(start + m + 1)  # keep `pending` and the accepted drafts
        produced.append(final)
        # Draft more when everything passed, less after a rejection.
        self.draft_len = min(MAX_DRAFT, self.draft_len + 1) if m == n else max(1, m + 1)
        # A stop token among the accepted drafts ends the answer there.
        for i, item in enumerate(produced):
            if item[0] in self.stop_ids:
                return produced[: i + 1]
        return produced
