"""What each training method and objective is, said once, as data.

`sortedchat train --method M --objective O`: the option checks (`recipe`), the trainer and the export read
these descriptions instead of comparing names, so a method's rules live in one row. Plain data without
torch: `recipe` (and so the command line's start-up) imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class MethodName(str, Enum):
    SOFT = "soft"
    SFT = "sft"
    ICT = "ict"
    LENS = "lens"


class LossExits(Enum):
    """Which of the run's exits get a loss."""

    ALL = "all"
    LAST = "last"
    BELOW_LAST = "below the last"

    def of(self, exits: list[int], num_layers: int) -> list[int]:
        return {LossExits.ALL: exits, LossExits.LAST: [num_layers], LossExits.BELOW_LAST: exits[:-1]}[self]


class ExitPart(Enum):
    """What a method trains per exit, beside or instead of the decoder."""

    HEADS = "new exit heads"  # SFT+ICT: a norm and a full head per intermediate exit
    LENSES = "per-exit lenses"  # one affine map per intermediate exit, before the shared norm and head


@dataclass(frozen=True)
class Method:
    name: MethodName
    summary: str  # how `--method`'s help describes it
    loss_exits: LossExits
    trains_decoder: bool  # False: the model is frozen (no --lora, no layer dropout; its own pass is the teacher)
    own_parts: ExitPart | None  # trained per exit on the frozen model
    keeps_last: bool = False  # --exits-per-step always samples the last exit with the others
    lenses_allowed: bool = False  # --lenses trains lenses with the model
    distils_top_k: bool = True  # --kd-top-k's candidate-set losses apply (only to the shared head)
    quantized_without_lora: bool = False  # trains on a 4/8-bit base without an adapter (its parts are float32)
    writes_weights: bool = True  # export writes model weights; False: only the trained parts, naming the base

    @property
    def weighs_exits(self) -> bool:
        """Whether --exit-weights and --exits-per-step apply (more than one exit is trained)."""
        return self.loss_exits is not LossExits.LAST


METHODS: dict[str, Method] = {m.name.value: m for m in (
    Method(MethodName.SOFT, "all exits", LossExits.ALL, trains_decoder=True, own_parts=None, keeps_last=True,
           lenses_allowed=True),
    Method(MethodName.SFT, "last exit", LossExits.LAST, trains_decoder=True, own_parts=None, lenses_allowed=True),
    Method(MethodName.ICT, "frozen model, new head per exit", LossExits.BELOW_LAST, trains_decoder=False,
           own_parts=ExitPart.HEADS, distils_top_k=False, quantized_without_lora=True),
    Method(MethodName.LENS, "frozen model, affine lens per exit", LossExits.BELOW_LAST, trains_decoder=False,
           own_parts=ExitPart.LENSES, writes_weights=False),
)}


class ObjectiveName(str, Enum):
    CE = "ce"
    KD = "kd"
    CE_KD = "ce+kd"


@dataclass(frozen=True)
class Objective:
    """Per position and exit: `alpha * CE(label) + (1 - alpha) * KL(teacher || exit)` (`objectives`)."""

    name: ObjectiveName
    summary: str
    alpha: float

    @property
    def needs_teacher(self) -> bool:
        """Whether the frozen starting model's full depth is distilled from."""
        return self.alpha < 1.0


OBJECTIVES: dict[str, Objective] = {o.name.value: o for o in (
    Objective(ObjectiveName.CE, "cross-entropy on the data's answers", 1.0),
    Objective(ObjectiveName.KD, "distil the frozen start's full depth", 0.0),
    Objective(ObjectiveName.CE_KD, "half each", 0.5),
)}


def described(table: dict) -> str:
    """`name (summary), ...` of every row: the help text of the option that picks one."""
    return ", ".join(f"{name} ({row.summary})" for name, row in table.items())


def trains_lenses(method: str, lenses: bool) -> bool:
    """Whether a run trains exit lenses: `--method lens`, or `--lenses` beside the model."""
    return METHODS[method].own_parts is ExitPart.LENSES or lenses
