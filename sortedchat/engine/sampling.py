"""Turning logits into tokens: greedy, or temperature / top-k / top-p sampling with a seed.

The warpers are transformers' own, so a seeded sampled answer follows the same distribution
`model.generate` would use. Speculative sampling needs the full distributions, not just a token,
which is why `distribution` is separate from `pick`.
"""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from sortedchat.engine.sampling_config import SamplingConfig


class Sampler:
    def __init__(self, cfg: SamplingConfig, device: torch.device):
        self.cfg = cfg
        self.generator = None
        if cfg.seed is not None:
            self.generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
        warpers = []
        if not cfg.greedy:
            if cfg.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(cfg.temperature))
            if cfg.top_k > 0:
                warpers.append(TopKLogitsWarper(cfg.top_k))
            if cfg.top_p < 1.0:
                warpers.append(TopPLogitsWarper(cfg.top_p))
        self.warpers = LogitsProcessorList(warpers)

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities after the warpers, float32, for each row of `logits` [n, V]."""
        logits = logits.float()
        if self.warpers:
            logits = self.warpers(None, logits)
        return torch.softmax(logits, dim=-1)

    def draw(self, probs: torch.Tensor) -> int:
        """Sample one token from a [V] distribution with the seeded generator."""
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))

    def uniform(self) -> float:
        return float(torch.rand(1, generator=self.generator))

    def pick(self, logits: torch.Tensor) -> tuple[int, float]:
        """One token from [V] logits and the probability the exit gave it (its confidence)."""
        if self.cfg.greedy:
            probs = torch.softmax(logits.float(), dim=-1)
            p, token = probs.max(dim=-1)
            return int(token), float(p)
        probs = self.distribution(logits[None])[0]
        token = self.draw(probs)
        return token, float(probs[token])
