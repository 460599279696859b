"""Run every decoding mode on the same prompts in one process, alternating, and summarise each mode.

Modes: transformers' `model.generate` at full depth (the baseline), transformers' own self-speculative
decoding (`assistant_early_exit=k`) at each draft exit, and our engine at full depth, at each exit
(fixed depth), in auto mode at the model's thresholds and confidence measure (with exact K/V, "auto", and
with propagated K/V, "auto:propagate"), and speculative at each draft exit.

Protocol (the same for every mode): greedy, exactly `max_new_tokens` tokens per prompt with end-of-turn
ignored (`eos_token_id=None` for transformers, `stop_at_end_of_turn=False` for the engine), so every mode
does the same amount of work and outputs compare position by position; timing covers the whole call,
prefill included.
After one warm-up run of every mode (which also records its peak memory), each repeat runs every prompt
through every mode back to back, the order of the modes rotating from repeat to repeat. Per mode and
repeat, tokens/s = tokens / seconds over all prompts; the table shows the median over repeats, and the
ratio is the median of the per-repeat ratios to the baseline of the same repeat (robust to load from
other processes). Agreement is the share of positions whose token equals the baseline's.

Two clocks are recorded for every run: wall time, and the CPU time of this process. On a CPU shared with
other work and with one torch thread, CPU time leaves out the time the process waited for a core, so
its ratios are what an idle machine would show; the table uses the clock asked for (`--clock`).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace

import torch

from sortedchat import SortedChatError
from sortedchat.bench.costs import Costs
from sortedchat.bench.peer import KEY as PEER_KEY
from sortedchat.bench.peer import LlamaCpp
from sortedchat.engine import ChatSession, Mode, SamplingConfig
from sortedchat.engine.context import encode_chat
from sortedchat.engine.modes import KV, NameEnum
from sortedchat.sorted_model import SortedModel

PROTOCOL = (
    "greedy; exactly max_new_tokens tokens per prompt with end-of-turn ignored by every mode; time = the whole "
    "call, prefill included; one warm-up run per mode; modes alternate prompt by prompt, their order rotating "
    "each repeat; tok/s = median over repeats; ratio = median of per-repeat ratios to the baseline; agreement = "
    "share of positions whose token equals the baseline's; forced agreement (fixed depth, full, auto) = share of "
    "steps whose token equals the baseline's when every step is fed the baseline's previous tokens (teacher "
    "forcing, untimed); decoding alone (our engine but speculative rows, llama.cpp) = tokens after the first / wall "
    "seconds from the first token to the last, prefill left out"
)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class RowKind(NameEnum):
    """What a row runs: transformers' `generate` (HF, and HF_EE with its early-exit assistant), our engine
    (FULL depth, a fixed DEPTH, AUTO, SPEC as users get it, DRAFT drafting always), or llama.cpp on the same GGUF
    (PEER, `peer`)."""

    HF = "hf"
    HF_EE = "hf-ee"
    FULL = "full"
    DEPTH = "depth"
    AUTO = "auto"
    SPEC = "spec"
    DRAFT = "draft"
    PEER = "peer"


@dataclass
class ModeSpec:
    key: str  # "hf", "hf-ee:15", "full", "depth:15", "auto", "auto:propagate", "spec:15", "draft:15"
    label: str
    kind: RowKind
    exit: int | None = None
    mode: Mode | None = None


@dataclass
class Tally:
    """What the runs of one mode added up to."""

    seconds: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CLOCKS})  # per repeat
    tokens: list[int] = field(default_factory=list)  # per repeat
    # per repeat, wall clock, from each answer's first token to its last (None: a row that cannot tell, `generate`)
    decode_seconds: list[float | None] = field(default_factory=list)
    agree: int = 0
    compared: int = 0
    forced_agree: int = 0
    forced_compared: int = 0
    exit_sum: int = 0
    exit_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    verifications: int = 0
    paced: int = 0
    check_seconds: float = 0.0
    checks: int = 0
    peak_bytes: int | None = None


@dataclass
class Row:
    key: str
    label: str
    kind: RowKind
    exit: int | None
    clock: str
    tokens_per_second: float  # by `clock`
    ratio: float  # by `clock`
    decode_tokens_per_second: float | None  # wall clock, the prompt's prefill and first token left out
    agreement: float
    forced_agreement: float | None  # teacher-forced, for the modes that choose one token per step
    mean_exit: float | None
    acceptance: float | None
    accepted_per_verification: float | None  # speculative (ours): accepted drafts per verification pass
    paced_share: float | None  # speculative: share of tokens decoded at full depth because drafting was slower
    peak_memory_mib: float | None
    ideal_ratio: float | None
    check_share: float | None  # confidence-check time / the time of a full-depth token of our engine
    checks_per_token: float | None
    by_clock: dict[str, dict]  # clock -> tokens_per_second, ratio, per_repeat (tokens/s)
    kv: str | None = None  # our engine's rows: how skipped layers got their K/V (exact, propagate)

    def to_dict(self) -> dict:
        return asdict(self)


ALWAYS = ("hf", "full")  # the baseline, and our full depth (the check cost is a share of its token)


def bench_modes(sm: SortedModel, only: list[str] | None = None) -> list[ModeSpec]:
    """The rows of the benchmark: "hf ..." rows are transformers' `generate`, the others our engine.
    "spec:k" is speculative mode as users get it (paced: full depth while drafting is measured slower),
    "draft:k" the same with drafting always on, which shows what drafting itself costs.

    `only` keeps the named keys (e.g. ["spec:24", "auto"]) besides the baseline and full depth, in the
    usual order; an unknown key is an error that lists the valid ones."""
    L, drafts = sm.num_layers, sm.exits[:-1]
    specs = [ModeSpec("hf", "hf generate", RowKind.HF, L)]
    specs += [ModeSpec(f"hf-ee:{k}", f"hf early-exit {k}", RowKind.HF_EE, k) for k in drafts]
    specs.append(ModeSpec("full", f"depth {L}", RowKind.FULL, L, Mode.fixed(L)))
    specs += [ModeSpec(f"depth:{k}", f"depth {k}", RowKind.DEPTH, k, Mode.fixed(k)) for k in drafts]
    specs.append(ModeSpec("auto", f"auto ({sm.config.confidence})", RowKind.AUTO, None, Mode.auto()))
    specs.append(ModeSpec("auto:propagate", f"auto ({sm.config.confidence}), propagated KV", RowKind.AUTO, None,
                          Mode.auto(kv=KV.PROPAGATE)))
    specs += [ModeSpec(f"spec:{k}", f"speculative {k}", RowKind.SPEC, k, Mode.speculative(k)) for k in drafts]
    specs += [ModeSpec(f"draft:{k}", f"speculative {k}, always drafting", RowKind.DRAFT, k,
                       Mode.speculative(k, pace=False)) for k in drafts]
    if only is None:
        return specs
    known = [s.key for s in specs]
    unknown = [k for k in only if k not in known]
    if unknown:
        raise SortedChatError(f"--modes: unknown mode {unknown[0]!r} (this model has {', '.join(known)})")
    return [s for s in specs if s.key in ALWAYS or s.key in only]


class PeakMemory:
    """Peak memory of what runs inside: CUDA's allocator peak, or the process's resident set sampled
    every 2 ms on a CPU (Linux /proc; None elsewhere)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: int | None = None
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int | None:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            rss = self._rss()
            if rss is not None:
                self.peak = max(self.peak or 0, rss)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()


@contextlib.contextmanager
def record_hf_acceptance(tally: Tally):
    """Count drafted and accepted tokens of transformers' early-exit assistant while inside.

    transformers reports each verification to `update_candidate_strategy(input_ids, scores, num_matches)`,
    with scores for every candidate plus the bonus token; we wrap that method and restore it after."""
    from transformers.generation.candidate_generator import EarlyExitCandidateGenerator

    original = EarlyExitCandidateGenerator.update_candidate_strategy

    def update(self, input_ids, scores, num_matches):
        tally.drafted += scores.shape[1] - 1
        tally.accepted += int(num_matches)
        return original(self, input_ids, scores, num_matches)

    EarlyExitCandidateGenerator.update_candidate_strategy = update
    try:
        yield
    finally:
        EarlyExitCandidateGenerator.update_candidate_strategy = original


@contextlib.contextmanager
def quiet_transformers():
    """transformers warns, inside its own assisted generation, about a generation config it builds itself."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


class Bench:
    """Holds the model, the prompts, one engine session per mode, and the tallies."""

    def __init__(
        self, sm: SortedModel, conversations: list[list[dict]], max_new_tokens: int, modes: list[str] | None = None
    ):
        self.sm = sm
        self.prompts = [encode_chat(sm, c) for c in conversations]
        self.n = max_new_tokens
        self.specs = bench_modes(sm, modes)
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, stop_at_end_of_turn=False)  # the protocol
        self.sessions = {spec.key: ChatSession(sm, spec.mode) for spec in self.specs if spec.mode is not None}
        self.tallies = {spec.key: Tally() for spec in self.specs}
        self.reference: dict[int, list[int]] = {}
        tok = sm.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.peer: LlamaCpp | None = None

    def add_peer(self, gguf, threads: int) -> None:
        """The llama.cpp row, on `gguf` with `threads` threads, for these prompts and answers."""
        self.peer = LlamaCpp(gguf, threads, context=max(map(len, self.prompts)) + self.n + 8)
        spec = ModeSpec(PEER_KEY, f"llama.cpp ({gguf.name})", RowKind.PEER, self.sm.num_layers)
        self.specs.append(spec)
        self.tallies[spec.key] = Tally()

    # -- one generation ------------------------------------------------------------------------------
    def generate(self, spec: ModeSpec, prompt_index: int,
                 tally: Tally) -> tuple[list[int], dict[str, float], float | None]:
        """The answer's tokens, the seconds it took by each clock, and the wall seconds from its first token to its
        last (None for `generate`, which hands over the answer whole, and for speculative rows, whose first token
        arrives with the rest of its round)."""
        ids = self.prompts[prompt_index]
        if spec.kind == RowKind.PEER:
            return self._timed(self.peer.tokens(ids, self.n))
        if spec.kind in (RowKind.HF, RowKind.HF_EE):
            x = torch.tensor([ids], device=self.sm.device)
            early_exit = spec.kind == RowKind.HF_EE
            extra = {"assistant_early_exit": spec.exit} if early_exit else {}
            guard = record_hf_acceptance(tally) if early_exit else contextlib.nullcontext()
            with guard, quiet_transformers():
                t = {c: clock() for c, clock in CLOCKS.items()}
                out = self.sm.model.generate(
                    x, attention_mask=torch.ones_like(x), max_new_tokens=self.n, do_sample=False,
                    eos_token_id=None, pad_token_id=self.pad_id, **extra,
                )
                self._sync()
                seconds = {c: clock() - t[c] for c, clock in CLOCKS.items()}
            return out[0, len(ids):].tolist(), seconds, None
        session = self.sessions[spec.key]
        session.reset()
        tokens, seconds, decoded = self._timed(ev.token_id for ev in session.generate_ids(ids, self.sampling))
        if spec.kind in (RowKind.SPEC, RowKind.DRAFT):  # its first token comes with a whole round's: not timed apart
            decoded = None
        st = session.last_stats
        tally.exit_sum += st.exit_sum
        tally.exit_tokens += st.tokens
        tally.drafted += st.drafted
        tally.accepted += st.accepted
        tally.verifications += st.verifications
        tally.paced += st.paced
        tally.check_seconds += st.check_seconds
        tally.checks += st.checks
        return tokens, seconds, decoded

    def _timed(self, tokens: Iterator[int]) -> tuple[list[int], dict[str, float], float | None]:
        """The tokens an answer's iterator gives, the seconds they took by each clock, and the wall seconds from the
        first to the last (None for fewer than two)."""
        t = {c: clock() for c, clock in CLOCKS.items()}
        out, first = [], None
        for token in tokens:
            out.append(token)
            if first is None:
                self._sync()
                first = time.perf_counter()
        self._sync()
        seconds = {c: clock() - t[c] for c, clock in CLOCKS.items()}
        return out, seconds, time.perf_counter() - first if len(out) > 1 else None

    def _sync(self) -> None:
        if self.sm.device.type == "cuda":
            torch.cuda.synchronize(self.sm.device)

    # -- the protocol --------------------------------------------------------------------------------
    def warm_up(self, progress: Callable[[str], None]) -> None:
        """One run of every mode on the longest prompt (discarded), recording peak memory; the
        baseline's answers to every prompt become the reference for agreement."""
        longest = max(range(len(self.prompts)), key=lambda i: len(self.prompts[i]))
        for spec in self.specs:
            progress(f"warm-up: {spec.label}")
            with PeakMemory(self.sm.device) as mem:
                self.generate(spec, longest, Tally())
            self.tallies[spec.key].peak_bytes = mem.peak
        for i in range(len(self.prompts)):
            progress(f"reference answer {i + 1}/{len(self.prompts)}")
            self.reference[i] = self.generate(self.specs[0], i, Tally())[0]

    def run(self, repeat: int, progress: Callable[[str], None]) -> None:
        for r in range(repeat):
            order = self.specs[r % len(self.specs):] + self.specs[: r % len(self.specs)]
            seconds = {spec.key: dict.fromkeys(CLOCKS, 0.0) for spec in self.specs}
            tokens = dict.fromkeys(seconds, 0)
            decoding: dict[str, float | None] = dict.fromkeys(seconds, 0.0)
            for i in range(len(self.prompts)):
                progress(f"repeat {r + 1}/{repeat} · prompt {i + 1}/{len(self.prompts)}")
                for spec in order:
                    tally = self.tallies[spec.key]
                    answer, took, decoded = self.generate(spec, i, tally)
                    for c in CLOCKS:
                        seconds[spec.key][c] += took[c]
                    tokens[spec.key] += len(answer)
                    if decoding[spec.key] is not None:
                        decoding[spec.key] = None if decoded is None else decoding[spec.key] + decoded
                    ref = self.reference[i]
                    tally.agree += sum(a == b for a, b in zip(answer, ref))
                    tally.compared += max(len(answer), len(ref))
            for spec in self.specs:
                tally = self.tallies[spec.key]
                for c in CLOCKS:
                    tally.seconds[c].append(seconds[spec.key][c])
                tally.tokens.append(tokens[spec.key])
                tally.decode_seconds.append(decoding[spec.key])

    def teacher_forced(self, progress: Callable[[str], None]) -> None:
        """Per-token quality of the modes that choose one token per step: fed the baseline's answer, how
        often does the mode pick the baseline's next token? (Free-running agreement says less about
        that: after one different token the rest of the answer differs.)"""
        for spec in self.specs:
            if spec.kind not in (RowKind.FULL, RowKind.DEPTH, RowKind.AUTO):
                continue
            progress(f"teacher-forced: {spec.label}")
            session, tally = self.sessions[spec.key], self.tallies[spec.key]
            for i, ids in enumerate(self.prompts):
                ref = self.reference[i]
                session.reset()
                chosen = [ev.token_id for ev in session.generate_ids(ids, self.sampling, forced=ref)]
                tally.forced_agree += sum(a == b for a, b in zip(chosen, ref))
                tally.forced_compared += len(ref)

    # -- the summary ---------------------------------------------------------------------------------
    def rows(self, costs: Costs, clock: str = "wall") -> list[Row]:
        """One row per mode; `costs` give the ideal ratios, `clock` the column the table shows."""
        L = self.sm.num_layers
        base = {c: speeds_per_repeat(self.tallies["hf"], c) for c in CLOCKS}
        full_token_seconds = seconds_per_token(self.tallies["full"])
        rows = []
        for spec in self.specs:
            tally = self.tallies[spec.key]
            by_clock = speeds_by_clock(tally, base)
            exit_mean = mean_exit(spec, tally, L)
            rows.append(
                Row(key=spec.key, label=spec.label, kind=spec.kind, exit=spec.exit, clock=clock,
                    tokens_per_second=by_clock[clock]["tokens_per_second"], ratio=by_clock[clock]["ratio"],
                    decode_tokens_per_second=decode_speed(tally, len(self.prompts)),
                    mean_exit=exit_mean, ideal_ratio=ideal_ratio(spec, costs, exit_mean, L), by_clock=by_clock,
                    kv=spec.mode.kv if spec.mode is not None else None, **shares(spec, tally, full_token_seconds))
            )
        return rows


def speeds_per_repeat(tally: Tally, clock: str) -> list[float]:
    """Tokens/s of each repeat by `clock` (0 for a repeat the clock saw no time pass in)."""
    return [t / s if s > 0 else 0.0 for t, s in zip(tally.tokens, tally.seconds[clock])]


def speeds_by_clock(tally: Tally, base: dict[str, list[float]]) -> dict[str, dict]:
    """Per clock: the median tokens/s, the median of the per-repeat ratios to the baseline's tokens/s `base`
    (each repeat against the baseline of the same repeat, robust to load that comes and goes), the per-repeat
    tokens/s."""
    by_clock = {}
    for c in CLOCKS:
        tps = speeds_per_repeat(tally, c)
        by_clock[c] = {
            "tokens_per_second": statistics.median(tps),
            "ratio": statistics.median(a / b if b else 0.0 for a, b in zip(tps, base[c])),
            "per_repeat": tps,
        }
    return by_clock


def decode_speed(tally: Tally, answers: int) -> float | None:
    """The median over the repeats of the tokens after each answer's first per wall second from its first token to
    its last: decoding alone, which the prompt's prefill does not weigh on (None where a repeat could not tell)."""
    if not tally.decode_seconds or None in tally.decode_seconds:
        return None
    return statistics.median((t - answers) / s if s > 0 else 0.0
                             for t, s in zip(tally.tokens, tally.decode_seconds))


def seconds_per_token(tally: Tally) -> float:
    """The median wall seconds per token over the repeats: for our full depth, the unit of the check share."""
    return statistics.median(s / t for t, s in zip(tally.tokens, tally.seconds["wall"]))


def mean_exit(spec: ModeSpec, tally: Tally, num_layers: int) -> float | None:
    """The mean layer a token left at. transformers reports no exits: its baseline runs every layer, and with
    the early-exit assistant an accepted draft counts as leaving at the draft exit, every other token at full
    depth. Our engine counts the exits (None where it counted none)."""
    if spec.kind == RowKind.HF:
        return float(num_layers)
    if spec.kind == RowKind.HF_EE:
        total_tokens = sum(tally.tokens)
        return (tally.accepted * spec.exit + (total_tokens - tally.accepted) * num_layers) / total_tokens
    return tally.exit_sum / tally.exit_tokens if tally.exit_tokens else None


def ideal_ratio(spec: ModeSpec, costs: Costs, exit_mean: float | None, num_layers: int) -> float | None:
    """The speed-up over our full depth that the measured costs allow with no overhead: a fixed depth's, and
    auto mode's at its mean exit (less what skipped layers still cost with its K/V way); None for the others."""
    if spec.kind in (RowKind.FULL, RowKind.DEPTH):
        return costs.ideal_ratio(spec.exit, num_layers)
    if spec.kind == RowKind.AUTO and exit_mean is not None:
        saving = replace(costs, kv=spec.mode.kv).early_exit_saving(exit_mean, num_layers)
        return costs.token(num_layers) / (costs.token(num_layers) - saving)
    return None


def shares(spec: ModeSpec, tally: Tally, full_token_seconds: float) -> dict[str, float | None]:
    """The row's fields that are a tally's counts as shares; None where the mode counted none (the
    confidence-check figures are auto mode's only, the paced share speculative mode's as users get it)."""
    total_tokens = sum(tally.tokens)
    auto = spec.kind == RowKind.AUTO
    return {
        "agreement": tally.agree / tally.compared if tally.compared else 0.0,
        "forced_agreement": tally.forced_agree / tally.forced_compared if tally.forced_compared else None,
        "acceptance": tally.accepted / tally.drafted if tally.drafted else None,
        "accepted_per_verification": tally.accepted / tally.verifications if tally.verifications else None,
        "paced_share": tally.paced / tally.exit_tokens if spec.kind == RowKind.SPEC and tally.exit_tokens else None,
        "peak_memory_mib": tally.peak_bytes / 2**20 if tally.peak_bytes else None,
        "check_share": tally.check_seconds / total_tokens / full_token_seconds if auto else None,
        "checks_per_token": tally.checks / total_tokens if auto else None,
    }
