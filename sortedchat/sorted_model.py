"""A causal LM seen as a stack of nested sub-models: the first k layers, then the shared norm and head.

`SortedModel` wraps a Hugging Face `*ForCausalLM` without changing it. It gives the decoding engine and
the trainer the pieces they call themselves (embedding, rotary embedding, decoder layers, exit heads),
knows the exits and thresholds of `sortedchat.json`, and applies per-exit lenses (a small affine map of an
exit's hidden state before the shared norm and head) or per-exit heads (the SFT+ICT baseline) where a
checkpoint has them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from sortedchat.config import SortedConfig, default_exits, validate_exits
from sortedchat.head_product import HeadProduct


class ExitHeads(nn.Module):
    """Separate norm + LM head per exit, as trained by the SFT+ICT baseline (`sortedchat train --method ict`)."""

    def __init__(self, exits: list[int], hidden_size: int, vocab_size: int, norm_template: nn.Module):
        super().__init__()

        self.norms = nn.ModuleDict({str(e): copy.deepcopy(norm_template) for e in exits})
        self.heads = nn.ModuleDict({str(e): nn.Linear(hidden_size, vocab_size, bias=False) for e in exits})

    def forward(self, hidden: torch.Tensor, exit_layer: int) -> torch.Tensor:
        norm, head = self.parts(exit_layer)
        return head(norm(hidden))

    def has(self, exit_layer: int) -> bool:
        return str(exit_layer) in self.heads

    def parts(self, exit_layer: int) -> tuple[nn.Module, nn.Linear] | None:
        """The exit's own norm and head, or None for an exit trained without one."""
        if not self.has(exit_layer):
            return None
        key = str(exit_layer)
        return self.norms[key], self.heads[key]


class ExitLenses(nn.Module):
    """One affine translator per intermediate exit (a "tuned lens"), applied before the shared norm and head.

    Each starts as the identity, so a model with untrained lenses decodes exactly as without them. The full
    depth never has one: a lens changes only what an early exit predicts, never the full model's output.
    """

    def __init__(self, exits: list[int], hidden_size: int):
        super().__init__()
        self.lenses = nn.ModuleDict({str(e): nn.Linear(hidden_size, hidden_size) for e in exits})
        with torch.no_grad():
            for lens in self.lenses.values():
                lens.weight.copy_(torch.eye(hidden_size))
                lens.bias.zero_()

    @property
    def exits(self) -> list[int]:
        return sorted(int(k) for k in self.lenses)

    def has(self, exit_layer: int) -> bool:
        return str(exit_layer) in self.lenses

    def forward(self, hidden: torch.Tensor, exit_layer: int) -> torch.Tensor:
        lens = self.lenses[str(exit_layer)]
        return F.linear(hidden, lens.weight.to(hidden.dtype), lens.bias.to(hidden.dtype))


class LensedNorm(nn.Module):
    """An exit's lens followed by the shared final norm: what stands between a layer's output and the head."""

    def __init__(self, lenses: ExitLenses, exit_layer: int, norm: nn.Module):
        super().__init__()
        self.exit_layer = exit_layer
        self.lenses = [lenses]  # not a submodule: the lenses belong to the SortedModel
        self.norm = norm

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lenses[0](hidden, self.exit_layer))


def exit_head_parts(exit_layer: int, num_layers: int, norm: nn.Module, head: nn.Module,
                    exit_heads: ExitHeads | None = None,
                    exit_lenses: ExitLenses | None = None) -> tuple[nn.Module, nn.Module]:
    """(norm, head) between `exit_layer`'s raw output and its logits: the exit's own (SFT+ICT) where it has them,
    else its lens (if it has one) before the shared `norm`, and the shared `head`; the full depth always has the
    shared ones. The one place that decides it, for `SortedModel` (the engine, auto mode's measures, calibrate,
    eval) and for the training objective (which passes its model's norm and head, wrapped for training)."""
    if exit_layer != num_layers:
        own = exit_heads.parts(exit_layer) if exit_heads is not None else None
        if own is not None:
            return own
        if exit_lenses is not None and exit_lenses.has(exit_layer):
            return LensedNorm(exit_lenses, exit_layer, norm), head
    return norm, head


@dataclass
class SortedModel:
    """A HF causal LM, its tokenizer, and what `sortedchat.json` says about its exits."""

    model: nn.Module
    tokenizer: object
    config: SortedConfig
    source: str = ""
    weights_path: str = ""
    exit_heads: ExitHeads | None = None
    exit_lenses: ExitLenses | None = None

    def __post_init__(self) -> None:
        from sortedchat.hf_contract import check_architecture  # imports transformers: `info` reads facts without it

        check_architecture(self.model)
        self.num_layers = len(self.model.model.layers)
        exits = self.config.exits or default_exits(self.num_layers)
        self.exits = validate_exits(list(exits), self.num_layers, f"exits of {self.source or 'the model'}")
        self.config.exits = self.exits
        self.head_product = HeadProduct(self.model)

    # -- the parts the engine calls ---------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.embed_tokens.weight.dtype

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(input_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.model.rotary_emb(hidden, position_ids=position_ids)

    def head(self, hidden: torch.Tensor, exit_layer: int, greedy: bool = False) -> torch.Tensor:
        """Logits of the sub-model that stops after `exit_layer` layers, from that layer's raw output.

        `greedy=True` promises that only the argmax (and a rough softmax) will be used: the head may then
        estimate the vocabulary on a cheap copy (half precision or int8) and compute exactly only the tokens that
        may hold the argmax (`HeadProduct.screened`); the argmax is still the float32 one."""
        norm, head = self.head_parts(exit_layer)
        if head is not self.model.lm_head:  # the exit's own head: the shared head's kernels do not apply
            return head(norm(hidden))
        normed = norm(hidden)
        if greedy:
            screened = self.head_product.screened(normed)
            if screened is not None:
                return screened
        return self.head_product(normed)

    def head_parts(self, exit_layer: int) -> tuple[nn.Module, nn.Module]:
        """(norm, head) that `head` applies at `exit_layer` (`exit_head_parts`)."""
        return exit_head_parts(exit_layer, self.num_layers, self.model.model.norm, self.model.lm_head,
                               self.exit_heads, self.exit_lenses)

    def exit_norm(self, exit_layer: int) -> nn.Module:
        """What turns `exit_layer`'s raw output into the input of the shared head: its lens (if it has one)
        and the final norm (`exit_head_parts`, own heads aside)."""
        return exit_head_parts(exit_layer, self.num_layers, self.model.model.norm, self.model.lm_head,
                               exit_lenses=self.exit_lenses)[0]

    def normed_head(self, normed_hidden: torch.Tensor) -> torch.Tensor:
        """LM head on an already-normed state (HF's `hidden_states[-1]` is normed)."""
        return self.head_product(normed_hidden)

    # -- thresholds --------------------------------------------------------------------------------
    def thresholds(self, override: float | None = None, shift: float = 0.0) -> dict[int, float]:
        """Per-exit confidence thresholds for auto mode: the command line wins over `sortedchat.json`.

        An exit without a calibrated threshold gets 0.9; the last exit always accepts. `shift` moves every
        checked exit's threshold within [0, 1]; an exit at 1 or more (not checked) stays unchecked.
        """
        out = {}
        for e in self.exits[:-1]:
            t = override if override is not None else self.config.thresholds.get(e, 0.9)
            out[e] = t if t >= 1.0 or override is not None else min(1.0, max(0.0, t + shift))
        out[self.num_layers] = 0.0
        return out

    @property
    def default_draft_exit(self) -> int:
        """The exit nearest half the depth: the speculative draft depth when none is given."""
        candidates = self.exits[:-1] or [max(1, self.num_layers // 2)]
        return min(candidates, key=lambda e: abs(e - self.num_layers / 2))

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # -- analysis ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def exit_top_predictions(self, token_ids: list[int], k: int = 5) -> dict[int, list[tuple[int, float]]]:
        """For the last position of `token_ids`, each exit's top-k next tokens with probabilities.

        A fresh forward pass, independent of any decoding state: used by the chat's layer lens.
        """
        ids = torch.tensor([token_ids], device=self.device)
        out = self.model(input_ids=ids, output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states
        result = {}
        for e in self.exits:
            h = hidden[e][:, -1]
            logits = self.normed_head(h) if e == self.num_layers else self.head(h, e)
            probs = torch.softmax(logits.float(), dim=-1)[0]
            p, idx = probs.topk(k)
            result[e] = [(int(i), float(v)) for i, v in zip(idx, p)]
        return result
