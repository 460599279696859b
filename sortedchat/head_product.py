"""The LM head's matrix product on a CPU: the kernel that is fastest for the rows at hand, and a screen that
finds the float32 argmax for greedy decoding at a fraction of the memory traffic.

On SmolLM2-135M the norm + head (49152 x 576) costs as much as 6-9 decoder layers when run as `F.linear`,
so its kernel matters. Which kernel is fastest differs from CPU to CPU, so the screen is chosen on the machine it
runs on: the first greedy step times every screen (`head_screens.SCREENS`: a float16 or bfloat16 copy, as
`F.linear` or as a matrix-vector product; an int8 copy through torch's dynamic int8 kernel) against the exact
float32 product and keeps the fastest, or none if none beats the exact product (`choose_screen`; one choice per
head shape and thread count in a process). One position, 1 thread:
- Intel Xeon (AVX-512, bf16, AMX), 2026-12-02: float32 `F.linear` 9.0 ms, against a column-major copy 8.3 ms;
  float16 `F.linear` 11.4 ms and matrix-vector 14.4 ms (slower than float32); bfloat16 `F.linear` 8.0 ms and
  matrix-vector 3.2 ms;
- AMD EPYC (AVX-512, bf16, VNNI), 2026-12-02: float32 `F.linear` 11 ms, column-major 6.0-6.8 ms; bfloat16
  matrix-vector 10.7 ms; the int8 screen 2.0 ms (its kernel 1.1-1.4 ms);
- 2-64 positions (speculative verification): `weight @ hidden.T` 7 ms against `F.linear`'s 16-20 ms (an AMD CPU
  with AVX2); on the Xeon a column-major copy is about twice as fast for a few rows, so that kernel is timed on
  first use too (`MULTI_ROW`).
Everywhere else (GPUs, half-precision or quantized or biased heads, autograd) this is plain `lm_head`.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from sortedchat.head_screens import SCREENS, Screen

SCREEN = 8  # the leading estimates recomputed in float32 whatever the bounds say (a displayed confidence's top)
MOST_CANDIDATES = 1 / 8  # of the vocabulary: past this share recomputing candidates costs about the full product
EXACT = "float32"  # the exact product's name among the timings `choose_screen` compares
TIMED_CALLS = 2  # timed calls of each kernel after one warm-up: the fastest counts
# A smaller head is not screened: its exact product takes well under a millisecond, and timings that short would
# make the choice (and so the estimates beside the argmax) change from run to run.
MIN_SCREENED = 1 << 20  # weights


_CHOSEN: dict[tuple, Screen | None] = {}  # (head shape, threads) -> the screen chosen in this process
# The exact product over 2..MAX_ROWS positions (speculative verification), by name: both are float32 products of the
# same rows, in another order of the sums. Intel Xeon today, 1 thread, 2 / 4 / 9 rows: `weight @ rows.T` 27.4 / 24.4
# / 24.7 ms, `rows @ columns` 12.5 / 15.0 / 21.4 ms; the AMD CPU earlier: `weight @ rows.T` 7 ms.
MULTI_ROW = {
    "weight @ rows.T": lambda head, rows: (head.lm_head.weight @ rows.t()).t().contiguous(),
    "rows @ columns": lambda head, rows: rows @ head._copy("columns"),
}
_MULTI_CHOSEN: dict[tuple, str] = {}  # (head shape, threads) -> the multi-row kernel chosen in this process


def choose_screen(timings: dict[str, float]) -> Screen | None:
    """The screen with the least time (seconds by name, `EXACT` the float32 product), or None if none beats the
    exact product (a tie goes to the one named first)."""
    fastest = min(timings, key=timings.__getitem__)
    return None if fastest == EXACT else SCREENS[fastest]


def fastest_seconds(call) -> float:
    """The least time of `TIMED_CALLS` calls of `call`, after one call that warms it up."""
    call()
    seconds = []
    for _ in range(TIMED_CALLS):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return min(seconds)


class HeadProduct:
    """`lm_head(normed hidden)` through the fastest exact CPU kernel, plus `screened` for greedy argmax.

    The copies (column-major float32, the chosen screen's) are made on first use and remade if the weight changes.
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

    def _copy(self, name: str | torch.dtype):
        """The weight as "columns" (column-major), its "row_norms", or a screen's copy (by its `copy_name`)."""
        w = self.lm_head.weight
        key = (w.data_ptr(), tuple(w.shape), 0 if w.is_inference() else w._version)
        if self._key != key:
            self._copies, self._key = {}, key
        if name not in self._copies:
            w = w.detach()
            if name == "columns":
                self._copies[name] = w.t().contiguous()
            elif name == "row_norms":
                self._copies[name] = w.norm(dim=1)
            else:
                self._copies[name] = next(s for s in SCREENS.values() if s.copy_name == name).make_copy(w)
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
            out = MULTI_ROW[self.multi_row_kernel(flat)](self, flat)
        return out.reshape(*hidden.shape[:-1], out.shape[-1])

    def multi_row_kernel(self, rows: torch.Tensor) -> str:
        """The name of the faster `MULTI_ROW` kernel on this machine, timed on `rows` the first time (a small head
        keeps the first: its timings would be too short to choose on)."""
        w = self.lm_head.weight
        if w.numel() < MIN_SCREENED:
            return next(iter(MULTI_ROW))
        key = (tuple(w.shape), torch.get_num_threads())
        if key not in _MULTI_CHOSEN:
            timings = self.time_multi_row(rows)
            _MULTI_CHOSEN[key] = min(timings, key=timings.__getitem__)
        return _MULTI_CHOSEN[key]

    def time_multi_row(self, rows: torch.Tensor) -> dict[str, float]:
        """Seconds of every one of `MULTI_ROW` on `rows` [n, H] (normed positions)."""
        return {name: fastest_seconds(lambda k=kernel: k(self, rows)) for name, kernel in MULTI_ROW.items()}

    def screen(self, hidden: torch.Tensor) -> Screen | None:
        """The screen of this head on this machine, chosen on first use (`time_screens`, `choose_screen`); the
        copies of the screens not chosen are then let go."""
        w = self.lm_head.weight
        if w.numel() < MIN_SCREENED:
            return None
        key = (tuple(w.shape), torch.get_num_threads())
        if key not in _CHOSEN:
            _CHOSEN[key] = chosen = choose_screen(self.time_screens(hidden))
            for s in SCREENS.values():
                if chosen is None or s.copy_name != chosen.copy_name:
                    self._copies.pop(s.copy_name, None)
        return _CHOSEN[key]

    def time_screens(self, hidden: torch.Tensor) -> dict[str, float]:
        """Seconds of the exact product (`EXACT`) and of every one of `SCREENS` that can hold `hidden` (one normed
        position; one that cannot would return at once, unscreened, and seem fastest)."""
        timings = {EXACT: fastest_seconds(lambda: self(hidden))}
        peak = float(hidden.abs().max())
        for s in SCREENS.values():
            if peak < s.max_input and self._copy(s.copy_name) is not None:  # an int8 copy needs its kernel
                timings[s.name] = fastest_seconds(lambda s=s: self._screened(hidden, s))
        return timings

    def screened(self, hidden: torch.Tensor, screen: Screen | None = None) -> torch.Tensor | None:
        """Logits for one position whose argmax is the float32 head's, or None where this does not apply.

        The screen (`screen`, or the one chosen on this machine) estimates every logit with a bound on its error;
        every token whose estimate plus bound reaches the best lower bound (estimate minus bound) may hold the
        float32 argmax, and those candidates, with the `SCREEN` leading estimates, are recomputed in float32: the
        argmax among them is the float32 argmax (up to the order of the float32 sums: two logits within a few ulps
        may rank otherwise than in `__call__`). The returned logits are float32 at the candidates and estimates
        elsewhere (good for a displayed confidence, not for sampling). None (use `__call__`) when the candidates
        are more than `MOST_CANDIDATES` of the vocabulary (a near-tie of many), when no screen beats the exact
        product here, or off the CPU/float32 path."""
        if not self._routed() or hidden.numel() != hidden.shape[-1] or self.lm_head.weight.shape[0] <= SCREEN:
            return None
        screen = screen or self.screen(hidden)
        return None if screen is None else self._screened(hidden, screen)

    def _screened(self, hidden: torch.Tensor, screen: Screen) -> torch.Tensor | None:
        h = hidden.reshape(-1)
        peak = float(h.abs().max())
        if not peak < screen.max_input:  # past what the copy holds; inf and nan too
            return None
        estimate = screen.estimate(self._copy, h, peak)
        if estimate is None or not math.isfinite(estimate.widest):  # no copy here; past float16's range
            return None
        approx = estimate.logits
        # Only ids within twice the widest bound of the best estimate can reach its lower bound: bound those alone
        # (the widest bound is summed in float64, the ids' in float32: a margin far above their rounding).
        near = torch.nonzero(approx >= float(approx.max()) - 2.001 * estimate.widest).squeeze(1)
        bound, near_approx = estimate.bound(near), approx[near]
        lowest_best = float((near_approx - bound).max())
        # the leading estimates are near's own when near holds that many (every other estimate is below near's)
        leading = near[near_approx.topk(SCREEN).indices] if len(near) >= SCREEN else approx.topk(SCREEN).indices
        candidates = torch.cat([near[near_approx + bound >= lowest_best], leading]).unique()
        if len(candidates) > MOST_CANDIDATES * len(approx):
            return None
        approx[candidates] = self.lm_head.weight[candidates] @ h
        return approx.reshape(*hidden.shape[:-1], -1)
