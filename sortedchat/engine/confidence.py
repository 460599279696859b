"""Confidence measures for auto (instance-aware) early exit.

A measure looks at the hidden state leaving an exit and says how sure that exit is (a value in [0, 1]);
auto mode stops at the first exit whose confidence reaches its threshold and computes the full head only
there. What a check costs decides whether auto mode pays off: on SmolLM2-135M (vocabulary 49152, hidden
576) the full-vocabulary norm + head costs as much as 7-11 decoder layers, so the paper's measure
(`maxprob`) at every exit makes a token slower than running all 30 layers. The cheap measures score a
few hundred hidden-sized vectors instead of 49152 (see BENCHMARKS.md for the measured costs and quality):

- `maxprob`: maximum softmax probability of the exit's full head (the paper's; exact, expensive).
- `subset`: the maximum softmax probability over a candidate set of the vocabulary: the frequent tokens
  (a byte-level BPE numbers its pieces in merge order, so the first ids are the bytes and the most
  frequent merges), the recent context and the top tokens of the previous full head.
- `classifier`: a tiny per-exit MLP trained by `sortedchat calibrate` on the normed hidden state and the
  `subset` statistics, predicting whether the exit's token equals the last exit's.
- `saturation`: how little the residual stream still moves: the cosine similarity (floored at 0) between
  the hidden state leaving this exit and the one leaving the previous exit (the token's embedding before
  the first exit). No head at all, so it is the cheapest check; whether it ranks tokens well enough is
  what `sortedchat calibrate` measures.

Protocol, per token: `prepare(context)` once (the ids so far, the pending token included), then
`reached(hidden, exit_layer)` at every exit the token passes (checked or not), `measure(hidden, exit_layer)
-> (confidence, logits or None)` at each checked exit (logits when the measure computed the full head
anyway, so the chosen exit does not pay twice), then `observe(token_id, logits)` with the full logits of the
exit that chose the token.

Each measure computes its number in two batched steps over N positions at one exit (`Measure.record`, what
calibrate keeps of a position, from an `ExitView`; `Measure.score`, the confidence from it): auto mode runs
them for the one position at hand, `sortedchat calibrate` for every answer position of an example at once.
Thresholds are thus chosen on the very number auto mode compares with them (a test checks the two agree
position by position). A new measure is one `Measure` subclass added to `MEASURES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from sortedchat import SortedChatError
from sortedchat.config import CLASSIFIER_NAME, CONFIG_NAME, atomic_write
from sortedchat.sorted_model import SortedModel

FREQUENT = 1024  # ids [0, FREQUENT): bytes and the earliest BPE merges
RECENT = 64  # context tokens added to the candidate set
PREVIOUS_TOP = 64  # top tokens of the previous full head added to the candidate set
SUBSET_FEATURES = 3  # log max-prob, log margin to the runner-up, entropy (over the candidate set)


class ExitView:
    """What a measure may look at for N positions leaving one exit: the raw hidden state [N, H], the state it
    follows (`before`: the previous exit's, the embedding before the first) and the candidate set. The exit's
    full-head logits and the candidates' log-probabilities are computed once, when a measure first asks."""

    def __init__(self, sm: SortedModel, exit_layer: int, hidden: torch.Tensor, before: torch.Tensor | None = None,
                 candidates: "Candidates | None" = None):
        self.sm, self.exit_layer, self.hidden, self.before, self.candidates = sm, exit_layer, hidden, before, candidates

    @cached_property
    def logits(self) -> torch.Tensor:
        """[N, V] the exit's full head."""
        return self.sm.head(self.hidden, self.exit_layer)

    @cached_property
    def candidate_log_probs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed hidden [N, H], log-softmax over each position's candidates [N, C]): `Candidates.log_probs`."""
        return self.candidates.log_probs(self.sm, self.hidden, self.exit_layer)

    def computed_logits(self) -> torch.Tensor | None:
        """The full-head logits if a measure computed them (auto mode then does not pay for the head twice)."""
        return self.__dict__.get("logits")


class Measure:
    """One confidence measure: `record` and `score` are its number, the auto-mode hooks of the module docstring
    feed it one position at a time, and the calibration hooks fit and save what it learns. A measure overrides
    what it needs; registering its class in `MEASURES` makes it usable by auto mode, `sortedchat calibrate`
    (which lists the registry in its errors) and the benchmark's cost model, with no other change."""

    name = ""
    learns = False  # `fitted` trains on calibration's fit part (its thresholds are then chosen on the rest)

    def __init__(self, sm: SortedModel):
        self.sm = sm

    # -- the number: batched, the same for auto mode and calibrate --------------------------------------
    @staticmethod
    def record(view: ExitView) -> dict[str, torch.Tensor]:
        """What calibrate keeps of N positions at one exit to score them later, by name ([N, ...] each); two
        measures that record the same name record the same values."""
        raise NotImplementedError

    def score(self, records: dict[str, torch.Tensor], exit_layer: int) -> torch.Tensor:
        """[N] confidences in [0, 1] from what `record` kept at `exit_layer`."""
        raise NotImplementedError

    # -- auto mode: one position, exit by exit ---------------------------------------------------------
    def prepare(self, context: list[int]) -> None:
        pass

    def reached(self, hidden: torch.Tensor, exit_layer: int) -> None:
        pass

    def observe(self, token_id: int, logits: torch.Tensor) -> None:
        pass

    def view(self, hidden: torch.Tensor, exit_layer: int) -> ExitView:
        """The token at hand leaving `exit_layer` (what `prepare` and `reached` kept goes with it)."""
        return ExitView(self.sm, exit_layer, hidden)

    def __call__(self, hidden: torch.Tensor, exit_layer: int) -> tuple[float, torch.Tensor | None]:
        view = self.view(hidden, exit_layer)
        return float(self.score(self.record(view), exit_layer)[0]), view.computed_logits()

    # -- calibration -------------------------------------------------------------------------------
    @classmethod
    def fitted(cls, sm: SortedModel, exits: list[int], records: dict[str, torch.Tensor],
               agree: torch.Tensor) -> "Measure":
        """The measure as calibrate uses it, fitted on the fit part: `records` [E, N, ...] at the checked
        `exits` and whether each exit agreed with the last [E, N]. Most measures have nothing to fit."""
        return cls(sm)

    def save(self, directory: str | Path) -> list[Path]:
        """Write what `fitted` learned beside the weights; the files written."""
        return []


class MaxProb(Measure):
    """Maximum softmax probability of the exit's full-vocabulary head (the paper's measure)."""

    name = "maxprob"

    @staticmethod
    def record(view: ExitView) -> dict[str, torch.Tensor]:
        return {"maxprob": torch.softmax(view.logits.float(), dim=-1).max(dim=-1).values}

    def score(self, records: dict[str, torch.Tensor], exit_layer: int) -> torch.Tensor:
        return records["maxprob"]


def previous_top(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] logits of a full head -> [..., PREVIOUS_TOP] its top ids: candidates at the next position."""
    return logits.topk(PREVIOUS_TOP, dim=-1).indices


@dataclass
class Candidates:
    """Which vocabulary rows the cheap measures score at N positions, and their log-probabilities over them.

    Every position scores the ids below `frequent` (a contiguous slice of the head: no copy) and its own
    recent-context and previous-top ids above it; `extra` [U] is the union of the latter, and `member`
    [N, U] says which of them each position holds (None: all, as for auto mode's one position). The set holds
    the exit's own argmax often enough that its max-probability ranks positions as well as the full softmax
    does (the AUCs in BENCHMARKS.md)."""

    frequent: int
    extra: torch.Tensor
    member: torch.Tensor | None = None

    @classmethod
    def of(cls, sm: SortedModel, contexts: list[list[int]], tops: list[list[int]]) -> "Candidates":
        """Position n's ids so far, its own token last (`contexts[n]`), and the top ids of the full head at the
        position before (`tops[n]`, [] where none was computed)."""
        frequent = min(FREQUENT, sm.model.lm_head.weight.shape[0])
        rows = [{i for i in [*context[-RECENT:], *top] if i >= frequent} for context, top in zip(contexts, tops)]
        extra = sorted(set().union(*rows))
        member = None
        if any(len(row) < len(extra) for row in rows):
            column = {i: k for k, i in enumerate(extra)}
            member = torch.zeros(len(rows), len(extra), dtype=torch.bool)
            for n, row in enumerate(rows):
                member[n, [column[i] for i in row]] = True
            member = member.to(sm.device)
        return cls(frequent, torch.tensor(extra, dtype=torch.long, device=sm.device), member)

    def log_probs(self, sm: SortedModel, hidden: torch.Tensor, exit_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed hidden [N, H], log-softmax over each position's candidates [N, C], -inf off its own set) for
        the raw hidden [N, H] leaving `exit_layer`."""
        norm, head = sm.head_parts(exit_layer)
        h = norm(hidden)
        # F.linear, not `weight @ h`: the matrix-vector product has no fast bf16 kernel on CPUs.
        logits = torch.cat([F.linear(h, head.weight[: self.frequent]), F.linear(h, head.weight[self.extra])], dim=-1)
        logits = logits.float()
        if self.member is not None:
            logits[:, self.frequent :].masked_fill_(~self.member, float("-inf"))
        return h, torch.log_softmax(logits, dim=-1)


def subset_features(log_probs: torch.Tensor) -> torch.Tensor:
    """[..., C] candidate log-probs -> [..., 3]: log max-prob, log margin to the runner-up, entropy."""
    top2 = log_probs.topk(2, dim=-1).values
    margin = torch.log1p(-torch.exp(top2[..., 1] - top2[..., 0]).clamp(max=1 - 1e-6))
    probs = log_probs.exp()
    entropy = -(probs * torch.where(probs > 0, log_probs, 0.0)).sum(-1)  # 0·log 0 = 0 (masked-out entries)
    return torch.stack([top2[..., 0], margin, entropy], dim=-1)


class CandidateMeasure(Measure):
    """A measure that scores the candidate set of the token at hand: it follows the context and the previous
    full head."""

    def __init__(self, sm: SortedModel):
        super().__init__(sm)
        self.top: list[int] = []  # the previous full head's top ids (none before the first token)
        self.candidates: Candidates | None = None  # the token at hand's (`prepare`)

    def prepare(self, context: list[int]) -> None:
        self.candidates = Candidates.of(self.sm, [context], [self.top])

    def observe(self, token_id: int, logits: torch.Tensor) -> None:
        self.top = previous_top(logits).tolist()

    def view(self, hidden: torch.Tensor, exit_layer: int) -> ExitView:
        return ExitView(self.sm, exit_layer, hidden, candidates=self.candidates)


class SubsetProb(CandidateMeasure):
    """Maximum softmax probability over the candidate set (see `Candidates`)."""

    name = "subset"

    @staticmethod
    def record(view: ExitView) -> dict[str, torch.Tensor]:
        """The candidates' `subset_features` [N, SUBSET_FEATURES] (the classifier reads them too)."""
        return {"subset": subset_features(view.candidate_log_probs[1])}

    def score(self, records: dict[str, torch.Tensor], exit_layer: int) -> torch.Tensor:
        return records["subset"][..., 0].exp()


class Standardize(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ExitClassifier(nn.Module):
    """Per exit, an MLP from [normed hidden, subset features] to the logit of "this exit's token is the
    last exit's". Saved as `exit_classifier.safetensors` beside `sortedchat.json`."""

    def __init__(self, exits: list[int], hidden_size: int, width: int = 64):
        super().__init__()
        features = hidden_size + SUBSET_FEATURES
        self.nets = nn.ModuleDict(
            {
                str(e): nn.Sequential(Standardize(features), nn.Linear(features, width), nn.GELU(), nn.Linear(width, 1))
                for e in exits
            }
        )

    def forward(self, features: torch.Tensor, exit_layer: int) -> torch.Tensor:
        return self.nets[str(exit_layer)](features)[..., 0]

    def has(self, exit_layer: int) -> bool:
        return str(exit_layer) in self.nets

    @staticmethod
    def inputs(normed: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """[N, H + SUBSET_FEATURES]: the normed hidden state rounded to float16 (as calibration keeps it to train
        on) and the subset features."""
        return torch.cat([normed.to(torch.float16).float(), features.float()], dim=-1)

    def save(self, directory: str | Path) -> Path:
        """Write atomically (`config.atomic_write`)."""
        state = {k: v.contiguous().cpu() for k, v in self.state_dict().items()}
        return atomic_write(Path(directory) / CLASSIFIER_NAME, lambda tmp: save_file(state, str(tmp)))

    @classmethod
    def trained(cls, exits: list[int], hidden: torch.Tensor, features: torch.Tensor, agree: torch.Tensor,
                steps: int = 300, width: int = 64, seed: int = 0) -> "ExitClassifier":
        """One small MLP per exit fitted on [E, N] positions (full batch, AdamW, binary cross-entropy): the normed
        hidden states as `Classifier.record` keeps them, their subset features, and whether the exit agreed."""
        net = cls(exits, hidden.shape[-1], width)
        with torch.random.fork_rng(), torch.enable_grad():
            torch.manual_seed(seed)
            for j, e in enumerate(exits):
                x = cls.inputs(hidden[j], features[j])
                y = agree[j].float()
                mlp = net.nets[str(e)]
                mlp[0].mean.copy_(x.mean(0))
                mlp[0].std.copy_(x.std(0).nan_to_num(1.0) + 1e-4)
                opt = torch.optim.AdamW(mlp.parameters(), lr=1e-3, weight_decay=1e-2)
                for _ in range(steps):
                    opt.zero_grad()
                    loss = F.binary_cross_entropy_with_logits(mlp(x)[:, 0], y)
                    loss.backward()
                    opt.step()
        return net.eval()

    @classmethod
    def load(cls, path: Path, hidden_size: int) -> "ExitClassifier":
        try:
            state = load_file(str(path))
        except Exception as exc:
            raise SortedChatError(f"{path}: cannot load the exit classifier ({exc})") from None
        exits = sorted({int(k.split(".")[1]) for k in state})
        width = state[f"nets.{exits[0]}.1.weight"].shape[0] if exits else 64
        clf = cls(exits, hidden_size, width)
        try:
            clf.load_state_dict(state)
        except RuntimeError as exc:
            raise SortedChatError(f"{path}: the exit classifier does not fit this model ({exc})") from None
        return clf.eval()


class Classifier(CandidateMeasure):
    """P(exit's token == last exit's token) from the calibrated `ExitClassifier`."""

    name = "classifier"
    learns = True

    def __init__(self, sm: SortedModel, net: ExitClassifier | None = None):
        if net is None:
            path = Path(sm.weights_path) / CLASSIFIER_NAME
            if not path.is_file():
                raise SortedChatError(
                    f"{sm.source}: the 'classifier' confidence needs {CLASSIFIER_NAME} beside the weights; "
                    "run `sortedchat calibrate --measure classifier` first"
                )
            net = ExitClassifier.load(path, sm.model.config.hidden_size)
        super().__init__(sm)
        self.net = net.to(sm.device)

    @staticmethod
    def record(view: ExitView) -> dict[str, torch.Tensor]:
        """The normed hidden state in float16 (what the net reads) and the subset features."""
        normed, log_probs = view.candidate_log_probs
        return {"hidden": normed.to(torch.float16), "subset": subset_features(log_probs)}

    def score(self, records: dict[str, torch.Tensor], exit_layer: int) -> torch.Tensor:
        """0 (never passes) at an exit the net was not trained for. Computed where the net is, the model's device
        (calibrate keeps its records on the CPU)."""
        if not self.net.has(exit_layer):
            return torch.zeros(records["hidden"].shape[0], device=self.sm.device)
        inputs = ExitClassifier.inputs(records["hidden"], records["subset"]).to(self.sm.device)
        return torch.sigmoid(self.net(inputs, exit_layer))

    @classmethod
    def fitted(cls, sm: SortedModel, exits: list[int], records: dict[str, torch.Tensor],
               agree: torch.Tensor) -> "Classifier":
        return cls(sm, ExitClassifier.trained(exits, records["hidden"], records["subset"], agree))

    def save(self, directory: str | Path) -> list[Path]:
        return [self.net.save(directory)]


class Saturation(Measure):
    """Cosine similarity between the hidden state leaving this exit and the one leaving the previous exit."""

    name = "saturation"

    def __init__(self, sm: SortedModel):
        super().__init__(sm)
        self.before: torch.Tensor | None = None  # the state this exit is compared with
        self.current: torch.Tensor | None = None  # the state leaving the exit reached last

    @staticmethod
    def record(view: ExitView) -> dict[str, torch.Tensor]:
        """The cosine similarity, floored at 0, of the raw states leaving this exit and the one before."""
        return {"saturation": F.cosine_similarity(view.hidden.float(), view.before.float(), dim=-1).clamp(min=0.0)}

    def score(self, records: dict[str, torch.Tensor], exit_layer: int) -> torch.Tensor:
        return records["saturation"]

    def prepare(self, context: list[int]) -> None:
        self.before = self.sm.embed(torch.tensor([context[-1:]], device=self.sm.device))[:, -1]
        self.current = None

    def reached(self, hidden: torch.Tensor, exit_layer: int) -> None:
        if self.current is not None:
            self.before = self.current
        self.current = hidden

    def view(self, hidden: torch.Tensor, exit_layer: int) -> ExitView:
        return ExitView(self.sm, exit_layer, hidden, before=self.before)


# The registry: every name auto mode, calibrate and the cost model know, in the order calibrate tries them.
MEASURES: dict[str, type[Measure]] = {m.name: m for m in (MaxProb, SubsetProb, Classifier, Saturation)}


def check_configured(sm: SortedModel) -> None:
    """The measure the model's sortedchat.json names must be in `MEASURES`: checked here, where the registry is
    (config.py reads the file below the engine), when a session starts on the model; the error names the file."""
    name = sm.config.confidence
    if name not in MEASURES:
        where = Path(sm.weights_path) / CONFIG_NAME if sm.weights_path else CONFIG_NAME
        raise SortedChatError(f"{where}: 'confidence' {name!r} is not a confidence measure (choose "
                              f"{', '.join(MEASURES)})")


def make_measure(name: str, sm: SortedModel) -> Measure:
    if name not in MEASURES:
        raise SortedChatError(f"unknown confidence measure {name!r} (choose {', '.join(MEASURES)})")
    return MEASURES[name](sm)
