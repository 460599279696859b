"""A conversation with a sorted model: prompt reuse across turns, and the generation loop of all modes.

Every mode works on one `LayeredState`, and each has its own step function, which the loop calls with the
token to feed and which returns the `Step`s it chose; the loop shares the prefill and the bookkeeping.
Fixed depth (`_depth_step`) runs each token through layers 1..k. Auto mode (`_auto_step`) runs on exit by
exit and stops at the first confident one, never recomputing a layer. With `Mode.kv` "propagate", the
layers a token skipped get its K/V right after it (`LayeredState.propagate`). Speculative mode
(`_speculative_steps`) drafts at depth k; verifying is running the last draft to full depth, which drains
the drafted positions waiting at layer k+1 in one batched pass; a rejection is a crop. The mode is read
before every token, so a front end can change it mid-answer. The steps run their layers through the session's
`StepRunner`, the seam where a server runs the steps of concurrent sessions together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator

import torch

from sortedchat import SortedChatError
from sortedchat.engine.confidence import check_configured, make_measure
from sortedchat.engine.context import ContextFit, ContextWindow
from sortedchat.engine.drafting import Drafter
from sortedchat.engine.events import GenerationStats, PrefillProgress, Step, TokenEvent
from sortedchat.engine.modes import KV, Mode, ModeKind
from sortedchat.engine.repetition import RepetitionGuard
from sortedchat.engine.sampling import Sampler, SamplingConfig
from sortedchat.engine.speculative import verify
from sortedchat.engine.state import LayeredState
from sortedchat.engine.text import IncrementalText
from sortedchat.sorted_model import SortedModel

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
NO_LIMIT = 1 << 62  # the context length of a model that names none
PREFILL_CHUNK = 256  # a longer prompt pass runs in pieces of this many tokens, reporting progress after each


def stop_token_ids(sm: SortedModel) -> set[int]:
    tok = sm.tokenizer
    ids: set[int] = set()
    for source in (tok.eos_token_id, getattr(sm.model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    # each name looked up alone (the whole vocabulary, `get_vocab`, took 23 ms of every session's start); a name the
    # vocabulary lacks maps to the unknown token's id or None, whose name is not the one asked, or (some tokenizers
    # of their own) raises
    for name in END_OF_TURN_TOKENS:
        try:
            i = tok.convert_tokens_to_ids(name)
            if i is not None and tok.convert_ids_to_tokens(i) == name:
                ids.add(i)
        except (KeyError, ValueError, IndexError):
            continue
    return ids


@contextlib.contextmanager
def _check_time(stats: GenerationStats):
    """Count the time inside as auto mode's confidence-check time."""
    start = time.perf_counter()
    yield
    stats.check_seconds += time.perf_counter() - start


class _Answer:
    """The bookkeeping of one answer, shared by every mode: its stats, its text so far and its clocks."""

    def __init__(self, session: "ChatSession", prompt_tokens: int, stop_ids: set[int]):
        self.state = session.state
        self.stats = GenerationStats(num_layers=session.L, prompt_tokens=prompt_tokens)
        self.text = IncrementalText(session.sm.tokenizer, stop_ids)
        self.start = self.decode_start = time.perf_counter()
        self.evals0 = self.fills0 = 0

    def prefilled(self) -> None:
        """The prompt is in: decoding time and the compute counters start here."""
        self.decode_start = time.perf_counter()
        self.stats.prefill_seconds = self.decode_start - self.start
        self.evals0, self.fills0 = self.state.layer_evals, self.state.kv_fills
        self.stats.kv_fill_share = self.state.kv_fill_share

    def count(self) -> None:
        """Bring the compute counters and the decoding time up to date."""
        self.stats.layer_evals = self.state.layer_evals - self.evals0
        self.stats.kv_fills = self.state.kv_fills - self.fills0
        self.stats.decode_seconds = time.perf_counter() - self.decode_start

    def event(self, step: Step, index: int, is_stop: bool) -> TokenEvent:
        """Count the token in the stats (up to date whenever a front end reads them) and report it."""
        stats = self.stats
        stats.tokens += 1
        stats.exit_sum += step.exit_layer
        stats.exit_counts[step.exit_layer] = stats.exit_counts.get(step.exit_layer, 0) + 1
        self.count()
        return TokenEvent(
            index=index,
            token_id=step.token,
            text=self.text.push(step.token),
            exit_layer=step.exit_layer,
            confidence=step.confidence,
            elapsed=time.perf_counter() - self.start,
            drafted=step.drafted,
            accepted=step.accepted,
            is_stop=is_stop,
        )


class StepRunner:
    """How a session runs a decoding step's layers. This one runs them at once on the session's own state. A front
    end that serves several conversations may give each session (`ChatSession.runner`) a runner that runs the
    layers of several sessions' steps together (`sortedchat serve` does); whatever it does, it returns what this
    one returns and leaves the state as this one leaves it. The prompt pass does not go through it."""

    def layers(self, state: LayeredState, depth: int, new_ids: list[int] | None = None) -> torch.Tensor | None:
        """`state.run(depth, new_ids)`."""
        return state.run(depth, new_ids)


class ChatSession:
    """Owns the layered KV state of one conversation. Not thread-safe: one generation at a time."""

    def __init__(self, sm: SortedModel, mode: Mode | None = None):
        check_configured(sm)
        self.sm = sm
        self.L = sm.num_layers
        self.state = LayeredState(sm)
        self.mode = mode or Mode.fixed()
        self.stop_ids = stop_token_ids(sm)  # the model's end-of-turn tokens
        self.last_stats: GenerationStats | None = None
        self.window = ContextWindow(sm)  # what the model sees of a conversation longer than its context
        self.last_fit: ContextFit | None = None
        self._measures: dict[str, object] = {}
        self.drafter: Drafter | None = None  # kept across answers for one draft depth and length
        self.runner = StepRunner()  # runs each decoding step's layers (a server's batches several sessions')

    # -- public API --------------------------------------------------------------------------------
    @property
    def mode(self) -> Mode:
        """The mode of the next token. The loop reads it before every token, so a front end may set it
        mid-answer; setting it validates it (the one place a mode is checked against the model)."""
        return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        self._mode = mode.validate(self.L)

    def restart_drafting(self) -> None:
        """The next speculative round drafts the mode's starting length again (a new request on a reused session);
        how fast drafting measured stays."""
        if self.drafter is not None:
            self.drafter.restart()

    def fit(self, messages: list[dict], sampling: SamplingConfig | None = None) -> ContextFit:
        """What the model will see of `messages` for its next answer (`engine/context.py`: the oldest turns drop
        out when the conversation outgrows the context). Raises `ContextFull` for a last message that cannot fit
        at all, so a front end can refuse it before storing it."""
        return self.window.fit(messages, (sampling or SamplingConfig()).validate().max_new_tokens)

    def generate(
        self,
        messages: list[dict],
        sampling: SamplingConfig | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_prefill: PrefillProgress | None = None,
    ) -> Iterator[TokenEvent]:
        """Answer the last message of `messages` (a chat-template conversation), as much of it as fits (`fit`;
        `last_fit` keeps what the model saw)."""
        self.last_fit = self.fit(messages, sampling)
        return self.generate_ids(self.last_fit.prompt, sampling, should_stop, on_prefill=on_prefill)

    def generate_ids(
        self,
        prompt: list[int],
        sampling: SamplingConfig | None = None,
        should_stop: Callable[[], bool] | None = None,
        forced: list[int] | None = None,
        on_prefill: PrefillProgress | None = None,
    ) -> Iterator[TokenEvent]:
        """Answer `prompt` (token ids); the answer ends at the context's end whatever `max_new_tokens` says
        (`stopped` "context"). With `forced` (teacher forcing, for measuring a mode's per-token
        quality), each step still reports the token the mode chose, but the next step is fed `forced[i]`
        instead; the answer is then `len(forced)` tokens long. Speculative mode has no per-token choice
        to measure this way. A prompt pass longer than PREFILL_CHUNK tokens reports to `on_prefill`."""
        sampling = (sampling or SamplingConfig()).validate()
        limit = self.sm.max_positions
        if not prompt:
            raise SortedChatError("the prompt is empty")
        if limit and len(prompt) >= limit:
            raise SortedChatError(f"the prompt is {len(prompt)} tokens; the model's context holds {limit}")
        if forced is not None:
            if self.mode.kind is ModeKind.SPECULATIVE:
                raise SortedChatError("teacher forcing measures fixed-depth or auto mode, not speculative")
            sampling = dataclasses.replace(sampling, max_new_tokens=len(forced))
        return self._generate(prompt, sampling, should_stop or (lambda: False), forced, on_prefill)

    def reset(self) -> None:
        """Forget the conversation (a new chat)."""
        self.state.reset()
        self.window.reset()

    # -- the loop ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def _generate(self, prompt: list[int], sampling: SamplingConfig, should_stop, forced=None,
                  on_prefill: PrefillProgress | None = None) -> Iterator[TokenEvent]:
        stop_ids = self.stop_ids if sampling.stop_at_end_of_turn else set()
        guard = RepetitionGuard() if sampling.repeat_stop and sampling.stop_at_end_of_turn and forced is None else None
        sampler = Sampler(sampling, self.sm.device)
        answer = _Answer(self, len(prompt), stop_ids)
        stats = self.last_stats = answer.stats
        stats.context_limit = self.sm.max_positions
        self._prefill(prompt, stats, on_prefill)
        answer.prefilled()
        pending, emitted = prompt[-1], 0
        # The last token the context has room for: the prompt and the answer's tokens but the last are stored.
        budget = min(sampling.max_new_tokens, (self.sm.max_positions or NO_LIMIT) - len(prompt))
        while emitted < budget:
            if should_stop():
                stats.stopped = "interrupted"
                break
            mode = self.mode
            steps = self._decode(pending, mode, sampler, budget - emitted, forced is not None, stop_ids, stats)
            if mode.kv is KV.PROPAGATE:
                self.state.propagate()  # the layers this token skipped get its K/V now: nothing waits
            for step in steps:  # only the last step can be an end of turn (see `_speculative_round`)
                yield answer.event(step, emitted, step.token in stop_ids)
                pending = step.token if forced is None else forced[emitted]
                emitted += 1
                if guard is not None and guard.push(step.token):
                    stats.stopped = "repetition"
                    break
            if stats.stopped:
                break
            if steps[-1].token in stop_ids and forced is None:
                stats.stopped = "eos"
                break
        else:
            stats.stopped = "max_tokens" if budget == sampling.max_new_tokens else "context"
        answer.count()

    def _prefill(self, prompt: list[int], stats: GenerationStats, on_prefill: PrefillProgress | None) -> None:
        """Reuse the K/V of the longest common prefix and run the rest of the prompt but its last token, which
        is always fed anew: at a fixed depth only that deep (the rest waits), otherwise through every layer.
        A long rest runs in pieces of PREFILL_CHUNK tokens (the same K/V: each piece attends to the ones before),
        telling `on_prefill` after each how far it is."""
        state, mode = self.state, self.mode
        common = 0
        for a, b in zip(state.tokens, prompt[:-1]):
            if a != b:
                break
            common += 1
        state.crop(common)
        stats.reused_tokens = common
        rest = prompt[common:-1]
        stats.prefilled_tokens = len(rest)
        depth = (mode.depth or self.L) if mode.kind is ModeKind.DEPTH else self.L
        report = on_prefill if len(rest) > PREFILL_CHUNK else None
        for done in range(0, len(rest), PREFILL_CHUNK):
            if report:
                report(done, len(rest))
            state.run(depth, rest[done : done + PREFILL_CHUNK])
        if report:
            report(len(rest), len(rest))
        if mode.kv is KV.PROPAGATE:
            state.propagate()  # the prompt at a fixed depth, or a backlog left by earlier exact tokens

    def _decode(self, pending: int, mode: Mode, sampler: Sampler, budget: int, forcing: bool, stop_ids: set[int],
                stats: GenerationStats) -> list[Step]:
        """Feed `pending` and return what the mode chose: one step, or a speculative round's steps (at most
        `budget`, the tokens the answer has left)."""
        match mode.kind:
            case ModeKind.SPECULATIVE:
                return self._speculative_steps(pending, mode, sampler, budget, forcing, stop_ids, stats)
            case ModeKind.AUTO:
                return [self._auto_step(pending, mode, sampler, stats)]
            case ModeKind.DEPTH:
                return [self._depth_step(pending, mode.depth or self.L, sampler)]

    def _depth_step(self, token: int, depth: int, sampler: Sampler) -> Step:
        """Fixed depth: layers 1..depth, then the head."""
        logits = self.sm.head(self.runner.layers(self.state, depth, [token])[:, -1], depth, sampler.cfg.greedy)[0]
        token_out, confidence = sampler.pick(logits)
        return Step(token_out, confidence, depth)

    def _measure(self, mode: Mode):
        name = self.sm.config.confidence
        if name not in self._measures:
            self._measures[name] = make_measure(name, self.sm)
        return self._measures[name]

    def _auto_step(self, token: int, mode: Mode, sampler: Sampler, stats: GenerationStats) -> Step:
        """Run exit by exit; leave at the first exit whose confidence reaches its threshold.

        An exit whose threshold is 1 or more is not checked (calibration marks exits that never pay off
        that way). The measure's per-token work (`prepare`, `observe`) counts as check time."""
        thresholds = self.sm.thresholds(mode.threshold, mode.shift)
        measure = self._measure(mode)
        runner = self.runner
        out = runner.layers(self.state, self.sm.exits[0], [token])
        with _check_time(stats):
            measure.prepare(self.state.tokens)
        for e in self.sm.exits:
            if out is None:
                out = runner.layers(self.state, e)
            h = out[:, -1]
            measure.reached(h, e)
            if e == self.L:
                logits = self.sm.head(h, e, sampler.cfg.greedy)
                break
            if thresholds[e] >= 1.0:
                out = None
                continue
            with _check_time(stats):
                conf, logits = measure(h, e)
            stats.checks += 1
            if conf >= thresholds[e]:
                if logits is None:
                    logits = self.sm.head(h, e, sampler.cfg.greedy)
                break
            out = None
        token_out, p = sampler.pick(logits[0])
        with _check_time(stats):
            measure.observe(token_out, logits[0])
        return Step(token_out, p, e)

    def _speculative_steps(self, pending: int, mode: Mode, sampler: Sampler, budget: int, forcing: bool,
                           stop_ids: set[int], stats: GenerationStats) -> list[Step]:
        """A speculative round while drafting pays, as the pacer measures it (always with `pace=False`), else
        one full-depth step, which the pacer times. The last token of an answer, and every teacher-forced one,
        is a full-depth step: nothing to draft ahead of it."""
        depth = mode.depth or self.sm.default_draft_exit
        if self.drafter is None or not self.drafter.is_for(depth, mode.draft_len):
            self.drafter = Drafter(depth, mode.draft_len)  # another draft: its own length, measured afresh
        drafter = self.drafter
        start = time.perf_counter()
        if budget > 1 and not forcing and (drafter.pacer.draft_now() or not mode.pace):
            steps = self._speculative_round(pending, drafter, mode.draft_stop, sampler, budget, stop_ids, stats)
            drafter.pacer.record_draft(time.perf_counter() - start, len(steps))
            return steps
        step = self._depth_step(pending, self.L, sampler)
        if budget > 1:
            drafter.pacer.record_full(time.perf_counter() - start)
            stats.paced += 1
        return [step]

    def _speculative_round(self, pending: int, drafter: Drafter, draft_stop: float, sampler: Sampler, budget: int,
                           stop_ids: set[int], stats: GenerationStats) -> list[Step]:
        """Draft up to n tokens at depth k, verify them in one pass of layers k+1..L, crop what fails."""
        state, L, k = self.state, self.L, drafter.depth
        start = state.length  # position of `pending`
        drafts, draft_probs = self._draft(pending, k, drafter.size(budget), draft_stop, sampler, stop_ids)
        n = len(drafts)
        # Verification: the last draft runs to full depth, draining the drafted positions at k+1..L.
        out = self.runner.layers(state, L, [drafts[-1].token])
        full_logits = self.sm.head(out[:, -(n + 1) :], L)[0]  # predictions for positions start+1 .. start+n+1
        stats.drafted += n
        stats.verifications += 1
        m, final = verify([d.token for d in drafts], draft_probs, full_logits, sampler, L)
        stats.accepted += m
        if m < n:
            state.crop(start + m + 1)  # keep `pending` and the accepted drafts
        drafter.verified(m, n)
        steps = [dataclasses.replace(d, accepted=True) for d in drafts[:m]] + [final]
        # A stop token among the accepted drafts ends the answer there.
        return next((steps[: i + 1] for i, step in enumerate(steps) if step.token in stop_ids), steps)

    def _draft(self, pending: int, k: int, n: int, draft_stop: float, sampler: Sampler,
               stop_ids: set[int]) -> tuple[list[Step], list[torch.Tensor]]:
        """Up to n tokens at depth k, each fed the one before; an end of turn, or a token less sure than
        `draft_stop`, ends the draft. Sampling keeps each draft's distribution for the accept/reject test."""
        drafts, probs = [], []
        feed, runner = pending, self.runner
        for _ in range(n):
            logits = self.sm.head(runner.layers(self.state, k, [feed])[:, -1], k, sampler.cfg.greedy)[0]
            if sampler.cfg.greedy:
                token, conf = sampler.pick(logits)
            else:
                probs.append(sampler.distribution(logits[None])[0])
                token = sampler.draw(probs[-1])
                conf = float(probs[-1][token])
            drafts.append(Step(token, conf, k, drafted=True))
            feed = token
            if token in stop_ids or conf < draft_stop:
                break
        return drafts, probs
