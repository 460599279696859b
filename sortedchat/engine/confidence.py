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
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sortedchat import SortedChatError
from sortedchat.config import CLASSIFIER_NAME
from sortedchat.sorted_model import SortedModel

FREQUENT = 1024  # ids [0, FREQUENT): bytes and the earliest BPE merges
RECENT = 64  # context tokens added to the candidate set
PREVIOUS_TOP = 64  # top tokens of the previous full head added to the candidate set
SUBSET_FEATURES = 3  # log max-prob, log margin to the runner-up, entropy (over the candidate set)


class Measure:
    """The protocol of the module docstring; a measure overrides the hooks it needs (the rest do nothing)."""

    name = ""

    def prepare(self, context: list[int]) -> None:
        pass

    def reached(self, hidden: torch.Tensor, exit_layer: int) -> None:
        pass

    def __call__(self, hidden: torch.Tensor, exit_layer: int) -> tuple[float, torch.Tensor | None]:
        raise NotImplementedError

    def observe(self, token_id: int, logits: torch.Tensor) -> None:
        pass


class MaxProb(Measure):
    """Maximum softmax probability of the exit's full-vocabulary head (the paper's measure)."""

    name = "maxprob"

    def __init__(self, sm: SortedModel):
        self.sm = sm

    def __call__(self, hidden: torch.Tensor, exit_layer: int) -> tuple[float, torch.Tensor | None]:
        logits = self.sm.head(hidden, exit_layer)
        return float(torch.softmax(logits.float(), dim=-1).max()), logits


def head_parts(sm: SortedModel, exit_layer: int) -> tuple[nn.Module, torch.Tensor]:
    """The norm and the [V, H] head weight that `sm.head` applies at `exit_layer`."""
    heads = sm.exit_heads
    if heads is not None and exit_layer != sm.num_layers and heads.has(exit_layer):
        key = str(exit_layer)
        return heads.norms[key], heads.heads[key].weight
    return sm.exit_norm(exit_layer), sm.model.lm_head.weight


class CandidateSet:
    """Which vocabulary rows the cheap measures score, and their log-probabilities over that set.

    The frequent ids are a contiguous slice of the head (no copy); the context and previous-top ids are
    gathered once per token. The set holds the exit's own argmax often enough that its max-probability
    ranks positions as well as the full softmax does (the AUCs in BENCHMARKS.md)."""

    def __init__(self, sm: SortedModel):
        self.sm = sm
        self.frequent = min(FREQUENT, sm.model.lm_head.weight.shape[0])
        self.previous_top: list[int] = []
        self.extra = torch.empty(0, dtype=torch.long, device=sm.device)

    def prepare(self, context: list[int]) -> None:
        ids = {i for i in context[-RECENT:] if i >= self.frequent}
        ids.update(i for i in self.previous_top if i >= self.frequent)
        self.extra = torch.tensor(sorted(ids), dtype=torch.long, device=self.sm.device)

    def observe(self, logits: torch.Tensor) -> None:
        self.previous_top = logits.topk(PREVIOUS_TOP).indices.tolist()

    def log_probs(self, hidden: torch.Tensor, exit_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed hidden [H], log-softmax over the candidates [C]) for one position's raw hidden [1, H]."""
        norm, weight = head_parts(self.sm, exit_layer)
        h = norm(hidden)
        # F.linear, not `weight @ h`: the matrix-vector product has no fast bf16 kernel on CPUs.
        logits = torch.cat([F.linear(h, weight[: self.frequent]), F.linear(h, weight[self.extra])], dim=-1)[0]
        return h[0], torch.log_softmax(logits.float(), dim=-1)


def subset_features(log_probs: torch.Tensor) -> torch.Tensor:
    """[..., C] candidate log-probs -> [..., 3]: log max-prob, log margin to the runner-up, entropy."""
    top2 = log_probs.topk(2, dim=-1).values
    margin = torch.log1p(-torch.exp(top2[..., 1] - top2[..., 0]).clamp(max=1 - 1e-6))
    probs = log_probs.exp()
    entropy = -(probs * torch.where(probs > 0, log_probs, 0.0)).sum(-1)  # 0·log 0 = 0 (masked-out entries)
    return torch.stack([top2[..., 0], margin, entropy], dim=-1)


class CandidateMeasure(Measure):
    """A measure that scores the candidate set: it follows the context and the previous full head."""

    def __init__(self, sm: SortedModel):
        self.candidates = CandidateSet(sm)

    def prepare(self, context: list[int]) -> None:
        self.candidates.prepare(context)

    def observe(self, token_id: int, logits: torch.Tensor) -> None:
        self.candidates.observe(logits)


class SubsetProb(CandidateMeasure):
    """Maximum softmax probability over the candidate set (see `CandidateSet`)."""

    name = "subset"

    def __call__(self, hidden: torch.Tensor, exit_layer: int) -> tuple[float, None]:
        _, log_probs = self.candidates.log_probs(hidden, exit_layer)
        return float(log_probs.max().exp()), None


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

    @property
    def exits(self) -> list[int]:
        return sorted(int(e) for e in self.nets)

    def forward(self, features: torch.Tensor, exit_layer: int) -> torch.Tensor:
        return self.nets[str(exit_layer)](features)[..., 0]

    def save(self, directory: str | Path) -> Path:
        """Write atomically (temporary file, then rename)."""
        import os
        import tempfile

        from safetensors.torch import save_file

        path = Path(directory) / CLASSIFIER_NAME
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{CLASSIFIER_NAME}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: Path, hidden_size: int) -> "ExitClassifier":
        from safetensors.torch import load_file

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
    """P(exit's token == last exit's token) from the calibrated `ExitClassifier`; an exit the
    classifier was not trained for never passes (confidence 0)."""

    name = "classifier"

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
        self.trained = set(self.net.exits)

    def __call__(self, hidden: torch.Tensor, exit_layer: int) -> tuple[float, None]:
        if exit_layer not in self.trained:
            return 0.0, None
        h, log_probs = self.candidates.log_probs(hidden, exit_layer)
        features = torch.cat([h.float(), subset_features(log_probs)])
        return float(torch.sigmoid(self.net(features, exit_layer))), None


def saturation(hidden: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two residual-stream states [..., H], floored at 0 (a confidence in [0, 1])."""
    return F.cosine_similarity(hidden.float(), before.float(), dim=-1).clamp(min=0.0)


class Saturation(Measure):
    """Cosine similarity between the hidden state leaving this exit and the one leaving the previous exit."""

    name = "saturation"

    def __init__(self, sm: SortedModel):
        self.sm = sm
        self.before: torch.Tensor | None = None  # the state this exit is compared with
        self.current: torch.Tensor | None = None  # the state leaving the exit reached last

    def prepare(self, context: list[int]) -> None:
        self.before = self.sm.embed(torch.tensor([context[-1:]], device=self.sm.device))[:, -1]
        self.current = None

    def reached(self, hidden: torch.Tensor, exit_layer: int) -> None:
        if self.current is not None:
            self.before = self.current
        self.current = hidden

    def __call__(self, hidden: torch.Tensor, exit_layer: int) -> tuple[float, None]:
        return float(saturation(hidden, self.before)), None


MEASURES = {m.name: m for m in (MaxProb, SubsetProb, Classifier, Saturation)}


def make_measure(name: str, sm: SortedModel):
    if name not in MEASURES:
        raise SortedChatError(f"unknown confidence measure {name!r} (choose {', '.join(MEASURES)})")
    return MEASURES[name](sm)
