"""The LM head's matrix product on a CPU: the kernel that is fastest for the rows at hand, and a
half-precision screen that finds the float32 argmax for greedy decoding at a fraction of the memory traffic.

On SmolLM2-135M the norm + head (49152 x 576) costs as much as 6-9 decoder layers when run as `F.linear`,
so its kernel matters. Which kernel is fastest differs from CPU to CPU, so the screen is chosen on the machine it
runs on: the first greedy step times every screen (`SCREENS`: a float16 or bfloat16 copy, as `F.linear` or as a
matrix-vector product) against the exact float32 product and keeps the fastest, or none if none beats the exact
product (`choose_screen`; one choice per head shape and thread count in a process). One position, 1 thread:
- Intel Xeon (AVX-512, bf16, AMX), today: float32 `F.linear` 9.0 ms, against a column-major copy 8.3 ms; float16
  `F.linear` 11.4 ms and matrix-vector 14.4 ms (slower than float32); bfloat16 `F.linear` 8.0 ms and
  matrix-vector 3.2 ms: the bfloat16 matrix-vector screen is chosen;
- a 2-core AMD CPU (AVX2), earlier: float32 `F.linear` 8.9 ms, column-major 4.3 ms, float16 3.3 ms;
- 2-64 positions (speculative verification): `weight @ hidden.T` 7 ms against `F.linear`'s 16-20 ms (AMD); on the
  Xeon a column-major copy is about twice as fast for a few rows, so that kernel is timed on first use too
  (`MULTI_ROW`).
Everywhere else (GPUs, half-precision or quantized or biased heads, autograd) this is plain `lm_head`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SCREEN = 8  # candidates recomputed in float32
EXACT = "float32"  # the exact product's name among the timings `choose_screen` compares
TIMED_CALLS = 2  # timed calls of each kernel after one warm-up: the fastest counts
# A smaller head is not screened: its exact product takes well under a millisecond, and timings that short would
# make the choice (and so the estimates beside the argmax) change from run to run.
MIN_SCREENED = 1 << 20  # weights


@dataclass(frozen=True)
class Screen:
    """A half-precision copy of the head and the call that ranks the vocabulary with it.

    A copy of w and h in a format of p significand bits carries relative errors of at most u = 2^-p each; the CPU
    kernels accumulate in float32 and round each result to the copy's format once more: a screened logit lies
    within `input_error` * |w_j| * |h| (2u, plus float32 accumulation) + `output_error` * |its value| (u) of the
    float32 one, and `slack` covers the underflow of tiny entries. float16: p = 11; bfloat16: p = 8 (measured
    against float64 on random, positive, aligned and badly scaled heads and states: at most 28% of the bound).
    Per-row norms, not the largest row's, keep bfloat16's wider bound from refusing real steps: on SmolLM2's
    greedy steps of the bench prompts it falls back on 1 of 144 (0 for float16; 73 with the largest row's
    norm). `max_input` is where a copy of the hidden state would overflow (bfloat16 has float32's range)."""

    name: str
    dtype: torch.dtype
    matrix_vector: bool  # `copy @ h`, rather than `F.linear(h, copy)`
    input_error: float
    output_error: float
    slack: float
    max_input: float

    def logits(self, copy: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The screen's estimate of every logit, float32, for one position [H]."""
        h = hidden.to(self.dtype)
        return (copy @ h if self.matrix_vector else F.linear(h, copy)).float()


HALF = dict(dtype=torch.float16, input_error=1.1e-3, output_error=5e-4, slack=1e-3, max_input=6.0e4)
BFLOAT = dict(dtype=torch.bfloat16, input_error=8e-3, output_error=4e-3, slack=1e-3, max_input=math.inf)
SCREENS = {s.name: s for s in (
    Screen("float16", matrix_vector=False, **HALF),
    Screen("float16 matrix-vector", matrix_vector=True, **HALF),
    Screen("bfloat16", matrix_vector=False, **BFLOAT),
    Screen("bfloat16 matrix-vector", matrix_vector=True, **BFLOAT),
)}

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

    def _copy(self, name: str | torch.dtype) -> torch.Tensor:
        """The weight as "columns" (column-major), its "row_norms", or a copy in a screen's dtype."""
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
                self._copies[name] = w.to(name)
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
                if chosen is None or s.dtype != chosen.dtype:
                    self._copies.pop(s.dtype, None)
        return _CHOSEN[key]

    def time_screens(self, hidden: torch.Tensor) -> dict[str, float]:
        """Seconds of the exact product (`EXACT`) and of every one of `SCREENS` that can hold `hidden` (one normed
        position; one that cannot would return at once, unscreened, and seem fastest)."""
        timings = {EXACT: fastest_seconds(lambda: self(hidden))}
        peak = float(hidden.abs().max())
        for s in SCREENS.values():
            if peak < s.max_input:
                timings[s.name] = fastest_seconds(lambda s=s: self._screened(hidden, s))
        return timings

    def screened(self, hidden: torch.Tensor, screen: Screen | None = None) -> torch.Tensor | None:
        """Logits for one position whose argmax is the float32 head's, or None where this does not apply.

        The screen (`screen`, or the one chosen on this machine) ranks the vocabulary; the top `SCREEN`
        candidates are recomputed in float32; if the best of them beats every other token's screened logit by
        more than the screen's error bound, it is the float32 argmax (among the candidates, up to the order of the
        float32 sums: two logits within a few ulps may rank otherwise than in `__call__`). The returned logits are
        float32 at the candidates and half-precision estimates elsewhere (good for a displayed confidence, not for
        sampling). None (use `__call__`) when the bound is not met (rare: a near-tie), when no screen beats the
        exact product here, or off the CPU/float32 path."""
        if not self._routed() or hidden.numel() != hidden.shape[-1] or self.lm_head.weight.shape[0] <= SCREEN:
            return None
        screen = screen or self.screen(hidden)
        return None if screen is None else self._screened(hidden, screen)

    def _screened(self, hidden: torch.Tensor, screen: Screen) -> torch.Tensor | None:
        h = hidden.reshape(-1)
        if not float(h.abs().max()) < screen.max_input:
            return None
        approx = screen.logits(self._copy(screen.dtype), h)
        top = approx.topk(SCREEN)
        candidates = top.indices
        exact = self.lm_head.weight[candidates] @ h
        # The most each other token's float32 logit can be (`Screen`): all must stay below the best candidate's.
        most = approx + (screen.input_error * float(h.norm()) * self._copy("row_norms") + screen.output_error
                         * approx.abs() + screen.slack)
        most[candidates] = -math.inf
        if not float(most.max()) < float(exact.max()):
            return None
        approx[candidates] = exact
        return approx.reshape(*hidden.shape[:-1], -1)
