"""How deep each token goes: a fixed exit, auto (confidence thresholds), or speculative drafting."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from sortedchat import SortedChatError


class NameEnum(str, Enum):
    """A `str` enum (what `enum.StrEnum` is from Python 3.11 on; sortedchat still runs on 3.10): a member
    equals, formats and serialises as its plain name ("auto"), so tables and JSON show the names."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class ModeKind(NameEnum):
    """The three ways of choosing a token's depth."""

    DEPTH = "depth"
    AUTO = "auto"
    SPECULATIVE = "speculative"


class KV(NameEnum):
    """How the layers a token skips get its K/V (see `Mode.kv`)."""

    EXACT = "exact"
    PROPAGATE = "propagate"


class ModeError(SortedChatError):
    """A mode that breaks one of `Mode`'s rules. `str()` is the engine's sentence; `field` is the `Mode` field at
    fault, `value` its value and `problem` what is wrong with it in the words a front end puts after its own name
    for the field ("--depth 40: the model has 30 layers"), so that the rule is written once, here."""

    def __init__(self, message: str, field: str, value, problem: str):
        super().__init__(message)
        self.field, self.value, self.problem = field, value, problem


@dataclass(frozen=True)
class Mode:
    """`kind` is a `ModeKind` (a plain name is turned into one). `depth` is the fixed depth or the draft depth
    (None: full depth / the model's default draft exit). `threshold` overrides every auto threshold;
    `shift` instead moves each calibrated per-exit threshold up or down (exits calibration switched off
    stay off), which is what the app's faster/closer keys do.
    `draft_len` is the initial number of drafted tokens per verification; `draft_stop` ends a draft early
    when the draft's confidence falls below it; `pace` lets the session decode at full depth while
    drafting is measured to be slower (`engine.pacing`), `pace=False` drafts always.
    `kv` (a `KV`) is how the layers a token skips get its K/V (`engine.state`): "exact" leaves them to be computed
    when a deeper token drains the backlog, "propagate" stores the projections of the exit's hidden state
    at once (approximate, nothing waits). Speculative decoding is exact only: its output must be the full
    model's.

    `validate` is the one check of a mode (a `ModeError` names the field); a `ChatSession` runs it whenever it is
    given a mode, the command line's mode flags and the server's body fields build a `Mode` and ask it."""

    kind: ModeKind = ModeKind.DEPTH
    depth: int | None = None
    threshold: float | None = None
    shift: float = 0.0
    draft_len: int = 4
    draft_stop: float = 0.0
    pace: bool = True
    kv: KV = KV.EXACT

    def __post_init__(self) -> None:
        try:
            kind = ModeKind(self.kind)
        except ValueError:
            raise SortedChatError(f"unknown mode {self.kind!r} ({', '.join(k.value for k in ModeKind)})") from None
        object.__setattr__(self, "kind", kind)  # frozen: the one way to normalise a field
        object.__setattr__(self, "kv", kv_way(self.kv))

    @classmethod
    def fixed(cls, depth: int | None = None, kv: KV = KV.EXACT) -> "Mode":
        return cls(ModeKind.DEPTH, depth, kv=kv)

    @classmethod
    def auto(cls, threshold: float | None = None, shift: float = 0.0, kv: KV = KV.EXACT) -> "Mode":
        return cls(ModeKind.AUTO, None, threshold, shift=shift, kv=kv)

    @classmethod
    def speculative(cls, depth: int, draft_len: int = 4, draft_stop: float = 0.0, pace: bool = True) -> "Mode":
        return cls(ModeKind.SPECULATIVE, depth, draft_len=draft_len, draft_stop=draft_stop, pace=pace)

    def validate(self, num_layers: int | None) -> "Mode":
        """The mode itself, or an error naming what is wrong. With `num_layers` None (a front end that has not
        loaded the model yet) the checks that need the layer count are left for later."""
        drafting = self.kind is ModeKind.SPECULATIVE
        if num_layers is not None and self.depth is not None:
            draft_range = f"draft depth must be in 1..{num_layers - 1}"
            if not 1 <= self.depth <= num_layers:
                raise ModeError(f"depth {self.depth} is outside 1..{num_layers} (the model has {num_layers} layers)",
                                "depth", self.depth, draft_range if drafting else f"the model has {num_layers} layers")
            if drafting and self.depth >= num_layers:
                raise ModeError(f"speculative draft depth must be below the last layer ({num_layers})", "depth",
                                self.depth, draft_range)
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ModeError(f"threshold {self.threshold} is outside 0..1", "threshold", self.threshold,
                            "must be in 0..1")
        if drafting and self.kv is not KV.EXACT:
            problem = "speculative decoding needs exact K/V (its output is the full model's)"
            raise ModeError(problem, "kv", self.kv, problem)
        if self.draft_len < 1:
            raise ModeError("draft length must be at least 1", "draft_len", self.draft_len, "must be at least 1")
        if not 0.0 <= self.draft_stop <= 1.0:
            raise ModeError(f"draft stop {self.draft_stop} is outside 0..1", "draft_stop", self.draft_stop,
                            "must be a probability in 0..1")
        return self

    def label(self, num_layers: int) -> str:
        """What the status line shows: the mode, and " · propagated KV" when the K/V are not exact."""
        return self._kind_label(num_layers) + (" · propagated KV" if self.kv is KV.PROPAGATE else "")

    def _kind_label(self, num_layers: int) -> str:
        if self.kind is ModeKind.AUTO:
            if self.threshold is not None:
                return f"Auto ≥{self.threshold:.2f}"
            return "Auto" if abs(self.shift) < 1e-9 else f"Auto, thresholds {self.shift:+.2f}"
        if self.kind is ModeKind.SPECULATIVE:
            return f"Speculative {self.depth}"
        return f"Depth {self.depth or num_layers}/{num_layers}"


def kv_way(value) -> KV:
    """`value` ("exact", "propagate" or a `KV`) as a `KV`, or a `ModeError` naming the choices."""
    try:
        return KV(value)
    except ValueError:
        raise ModeError(f"unknown K/V way {value!r} ({', '.join(KV)})", "kv", value,
                        f"choose {' or '.join(KV)}") from None
