"""What the engine tells front ends: one event per generated token, and a summary per answer; and the
`Step` each mode hands the generation loop, which turns it into the event."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

# Told how far a long prompt pass is: (prompt tokens run so far, tokens it runs in all).
PrefillProgress = Callable[[int, int], None]
NOTE_GAP = 0.05  # compute saved this far below what the exits skipped gets a word of why


@dataclass(frozen=True)
class Step:
    """One token a mode chose: what the loop needs of it to report a `TokenEvent` (the loop adds the index,
    the text and the time). A speculative round gives several, a fixed-depth or auto step one."""

    token: int
    confidence: float
    exit_layer: int
    drafted: bool = False
    accepted: bool | None = None


@dataclass
class TokenEvent:
    """One generated token.

    `text` is the new piece of the answer this token completes (empty while a multi-byte character is
    still incomplete, and for the end-of-turn token, which has `is_stop`). `exit_layer` is the depth whose
    head chose the token; `drafted` marks tokens proposed by the speculative draft and `accepted` whether
    the full model agreed. `elapsed` counts seconds since the generation started.
    """

    index: int
    token_id: int
    text: str
    exit_layer: int
    confidence: float
    elapsed: float
    drafted: bool = False
    accepted: bool | None = None
    is_stop: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationStats:
    """Summary of one answer. `compute_saved` compares the decoder-layer evaluations actually run
    (backlog catch-up and rejected drafts included, and propagated K/V at `kv_fill_share` of a layer each)
    with running every token through every layer. The prompt pass (`prefill_seconds`, over `prefilled_tokens`:
    the prompt less its reused prefix and its last token, which decoding feeds) is timed apart from decoding
    (`decode_seconds`), so each speed describes one of them. `context_limit` is the model's context (0: none)."""

    num_layers: int
    tokens: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    prefilled_tokens: int = 0
    context_limit: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    layer_evals: int = 0
    exit_sum: int = 0
    drafted: int = 0
    accepted: int = 0
    verifications: int = 0
    paced: int = 0  # speculative mode: tokens decoded at full depth because drafting was measured slower
    check_seconds: float = 0.0
    checks: int = 0
    kv_fills: int = 0  # (layer, position) K/V projections stored by propagation
    kv_fill_share: float = 0.0  # what one costs, as a share of a layer's weights
    exit_counts: dict[int, int] = field(default_factory=dict)
    stopped: str = ""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefilled_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def context_fill(self) -> float:
        """The share of the model's context the prompt and the answer take (0 when the model names none)."""
        return (self.prompt_tokens + self.tokens) / self.context_limit if self.context_limit else 0.0

    @property
    def mean_exit(self) -> float:
        return self.exit_sum / self.tokens if self.tokens else 0.0

    @property
    def compute_saved(self) -> float:
        full = self.num_layers * self.tokens
        return 1.0 - (self.layer_evals + self.kv_fills * self.kv_fill_share) / full if full else 0.0

    @property
    def compute_note(self) -> str:
        """Why `compute_saved` is below zero, or far below the share of layers the exits skipped ("" when it
        needs no word): the figure counts layer work done, not exits taken."""
        if self.compute_saved < 0:
            cause = "the rejected drafts" if self.drafted else "K/V filled in for the layers tokens skipped"
            return f"more layer work than full depth: {cause}"
        skipped = 1 - self.mean_exit / self.num_layers if self.tokens else 0.0
        if skipped - self.compute_saved >= NOTE_GAP:
            why = "verifying the drafts ran the deeper layers" if self.drafted else "most ran later for deeper tokens"
            return f"exits skipped {skipped:.0%} of layers, but {why}"
        return ""

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def accepted_per_verification(self) -> float | None:
        return self.accepted / self.verifications if self.verifications else None

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            tokens_per_second=self.tokens_per_second,
            prefill_tokens_per_second=self.prefill_tokens_per_second,
            context_fill=self.context_fill,
            mean_exit=self.mean_exit,
            compute_saved=self.compute_saved,
            acceptance_rate=self.acceptance_rate,
            accepted_per_verification=self.accepted_per_verification,
        )
        return out
