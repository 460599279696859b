"""The LM head's matrix product on a CPU: the kernel that is fastest for the rows at hand, and a
half-precision screen that finds the float32 argmax for greedy decoding at a fraction of the memory traffic.

On SmolLM2-135M the norm + head (49152 x 576) costs as much as 6 decoder layers when run as `F.linear`,
so its kernel matters (measured on a 2-core AVX2 CPU, float32; BENCHMARKS.md):
- one position: `F.linear` 8.9 ms; the same product against a column-major copy of the weight 4.3 ms;
  a float16 copy 3.3 ms (the head is memory-bound; float16 halves the bytes);
- 2-64 positions (speculative verification): `weight @ hidden.T` 7 ms against `F.linear`'s 16-20 ms.
Everywhere else (GPUs, half-precision or quantized or biased heads, autograd) this is plain `lm_head`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# A float16 copy of w and h carries relative errors of at most 2^-11 each, the CPU kernel accumulates in
# float32 and rounds its result to float16 once more (another 2^-11 of |logit| <= |w| |h|): each screened
# logit lies within HALF_ERROR * |w_j| * |h| of the float32 one (3 * 2^-11 = 1.47e-3, plus accumulation;
# measured on SmolLM2: at most 1.9e-4). The absolute term covers float16 underflow of tiny entries.
HALF_ERROR = 1.5e-3
HALF_SLACK = 1e-3
HALF_MAX = 6.0e4  # beyond this a float16 copy of the hidden state would overflow: no screening
SCREEN = 8  # candidates recomputed in float32


class HeadProduct:
    """`lm_head(normed hidden)` through the fastest exact CPU kernel, plus `screened` for greedy argmax.

    The copies (column-major float32, float16) are made on first use and remade if the weight changes.
    """

    MAX_ROWS = 64  # above this F.linear's matrix-matrix kernel is as good

    def __init__(self, model: nn.Module):
        self.model = model
        self._copies: dict[str, torch.Tensor] = {}
        self._key: tuple | None = None

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def _routed(self) -> bool:
        head = self.lm_head
        w = getattr(head, "weight", None)
        return (
            type(head) is nn.Linear
            and head.bias is None
            and w.device.type == "cpu"
            and w.dtype == torch.float32
            and not torch.is_grad_enabled()
        )

    def _copy(self, name: str) -> torch.Tensor:
        w = self.lm_head.weight
        key = (w.data_ptr(), tuple(w.shape), 0 if w.is_inference() else w._version)
        if self._key != key:
            self._copies, self._key = {}, key
        if name not in self._copies:
            w = w.detach()
            make = {
                "columns": lambda: w.t().contiguous(),
                "half": lambda: w.to(torch.float16),
                "row_norm_max": lambda: w.norm(dim=1).max(),
            }
            self._copies[name] = make[name]()
        return self._copies[name]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for `hidden` [..., H] (already normed), exact float32."""
        rows = hidden.numel() // hidden.shape[-1]
        if not self._routed() or rows > self.MAX_ROWS:
            return self.lm_head(hidden)
        flat = hidden.reshape(rows, hidden.shape[-1])
        if rows == 1:
            out = flat @ self._copy("columns")
        else:
            out = (self.lm_head.weight @ flat.t()).t().contiguous()
        return out.reshape(*hidden.shape[:-1], out.shape[-1])

    def screened(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits for one position whose argmax is the float32 head's, or None where this does not apply.

        The float16 product ranks the vocabulary; the top `SCREEN` candidates are recomputed in float32;
        if the best of them beats every other token's float16 logit by more than the error bound, it is the
        float32 argmax (among the candidates, up to the order of the float32 sums: two logits within a few
        ulps may rank otherwise than in `__call__`). The returned logits are float32 at the candidates and
        float16 estimates elsewhere (good for a displayed confidence, not for sampling). None (use
        `__call__`) when the bound is not met (rare: a near-tie), or off the CPU/float32 path."""
        if not self._routed() or hidden.numel() != hidden.shape[-1] or self.lm_head.weight.shape[0] <= SCREEN:
            return None
        h = hidden.reshape(-1)
        scale = float(h.abs().max())
        if not scale < HALF_MAX:
            return None
        approx = F.linear(h.to(torch.float16), self._copy("half")).float()
        top = approx.topk(SCREEN + 1)
        candidates = top.indices[:SCREEN]
        exact = self.lm_head.weight[candidates] @ h
        bound = HALF_ERROR * float(self._copy("row_norm_max")) * float(h.norm()) + HALF_SLACK
        if not float(top.values[SCREEN]) + bound < float(exact.max()):
            return None
        approx[candidates] = exact
        return approx.reshape(*hidden.shape[:-1], -1)
