"""Screens of the LM head for greedy decoding: cheap estimates of every logit of one position, each with a bound
on its distance from the float32 logit, so that `HeadProduct.screened` can recompute exactly just the tokens that
may hold the float32 argmax.

Two kinds, because CPUs differ in which product is cheap (`HeadProduct` times them on the machine it runs on):
- `HalfScreen`: a float16 or bfloat16 copy of the head (half float32's bytes);
- `Int8Screen`: an int8 copy, one scale per row, through torch's dynamic int8 kernel (a quarter of the bytes, and
  the kernel that runs the int8 head of `--quantize int8`). Its bound has to hold whatever the kernel does to the
  input, so the input reaches it already on the kernel's own grid (`Int8Copy.estimate`): the kernel then multiplies
  exact integers, and the only errors are the weights' rounding, a residual of the input at most 2^-14 of its
  largest entry (2^-12 with 7-bit inputs), and float32 rounding of the results.
Each screen takes what it needs of the head's copies through `copies` (`HeadProduct._copy`), made once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from sortedchat.quantize import full_range_is_exact, prepacked, row_scales


class Estimate(NamedTuple):
    """A screen's estimate of the logits of one position and what bounds its error."""

    logits: torch.Tensor  # [V] float32
    bound: Callable[[torch.Tensor], torch.Tensor]  # ids -> |float32 logit - estimate| is at most this, per id
    widest: float  # no id's bound is larger


@dataclass(frozen=True)
class HalfScreen:
    """A half-precision copy of the head and the call that ranks the vocabulary with it.

    A copy of w and h in a format of p significand bits carries relative errors of at most u = 2^-p each; the CPU
    kernels accumulate in float32 and round each result to the copy's format once more: a screened logit lies
    within `input_error` * |w_j| * |h| (2u, plus float32 accumulation) + `output_error` * |its value| (u) of the
    float32 one, and `slack` covers the underflow of tiny entries. float16: p = 11; bfloat16: p = 8 (measured
    against float64 on random, positive, aligned and badly scaled heads and states: at most 28% of the bound).
    Per-row norms, not the largest row's, keep bfloat16's wider bound from refusing real steps.
    `max_input` is where a copy of the hidden state would overflow (bfloat16 has float32's range)."""

    name: str
    dtype: torch.dtype
    matrix_vector: bool  # `copy @ h`, rather than `F.linear(h, copy)`
    input_error: float
    output_error: float
    slack: float
    max_input: float

    @property
    def copy_name(self) -> torch.dtype:
        return self.dtype

    def make_copy(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.to(self.dtype)

    def estimate(self, copies: Callable, h: torch.Tensor, peak: float) -> Estimate:
        """The estimate of every logit for one position `h` [H] (`peak`: its largest magnitude)."""
        x, copy, row_norms = h.to(self.dtype), copies(self.dtype), copies("row_norms")
        logits = (copy @ x if self.matrix_vector else F.linear(x, copy)).float()
        size = float(h.norm())
        widest = (self.input_error * size * float(row_norms.max()) + self.output_error * float(logits.abs().max())
                  + self.slack)
        return Estimate(logits, lambda ids: (self.input_error * size * row_norms[ids]
                                             + self.output_error * logits[ids].abs() + self.slack), widest)


@dataclass(frozen=True)
class Int8Screen:
    """The head in int8 (`Int8Copy`), through torch's dynamic int8 kernel. (`max_input`: the grid's ends, about
    128 times the largest entry, stay far from float32's overflow.)"""

    name: str = "int8"
    max_input: float = 1e30
    copy_name: str = "int8"

    @staticmethod
    def make_copy(weight: torch.Tensor) -> Int8Copy | None:
        return Int8Copy.of(weight)

    def estimate(self, copies: Callable, h: torch.Tensor, peak: float) -> Estimate | None:
        copy = copies(self.copy_name)
        return None if copy is None else copy.estimate(h, peak)


class Int8Copy:
    """A head's weights in int8, one scale per row (symmetric), packed for torch's dynamic int8 kernel with two
    input columns more, whose weights are zero.

    The kernel quantizes its input to 8 bits on a grid it derives from the input's range. Here the input arrives
    on a grid already: `h` is split into two rows of integers k1, k2 on the grid of `s1`, a power of two (h = s1*k1
    + s1/HALF*k2 + a residual at most s1/(2*HALF)), and the two extra columns hold the grid's ends (-HALF*s1 and
    (HALF-1)*s1), which set the kernel's scale to exactly s1 and its zero point to HALF. Each row's integer
    product is then exact, and the logit's error is the weights' rounding (half a row's scale per weight, against
    |h|_1), the residual against the row's |w_j|_1, and float32's rounding of the results. torch raises an input
    scale below about 6.1e-5 to that, so s1 is never below 2^-14: a tinier state leaves more of itself to the
    residual, which the bound counts."""

    MIN_GRID = -14  # log2 of the least s1

    def __init__(self, weight: torch.Tensor):
        w = weight.detach().float()
        self.rows, self.columns = w.shape
        self.scale = row_scales(w)
        padded = w.new_zeros(self.rows, self.columns + 2)  # in place from here: a head's copies are 100s of MB
        q = padded[:, :-2]
        q.copy_(w).div_(self.scale[:, None]).round_().clamp_(-127, 127)
        self.l1 = torch.linalg.vector_norm(q, ord=1, dim=1) * self.scale  # each row's |w_j|_1, as rounded
        self.half = 128 if full_range_is_exact() else 64  # 8-bit inputs, or the 7 bits of `reduce_range`
        q.mul_(self.scale[:, None])
        self.packed = prepacked(padded, self.scale)
        self.largest_scale, self.largest_l1 = float(self.scale.max()), float(self.l1.max())  # for every token's bound

    @classmethod
    def of(cls, weight: torch.Tensor) -> Int8Copy | None:
        """The copy of `weight`, or None where the kernel is missing or does not give the products exactly as
        this class assumes: a probe on the head's first rows, for a state with an outlier and a tiny one, against
        float64 (within the estimate's own allowance for float32's rounding)."""
        if torch.backends.quantized.engine in (None, "none") or not torch.backends.quantized.supported_engines:
            return None
        probe = cls(weight[:64])
        held = torch.ops.quantized.linear_unpack(probe.packed)[0].dequantize().double()[:, :-2]  # the kernel's weights
        g = torch.Generator().manual_seed(0)
        h = torch.randn(weight.shape[1], generator=g) * torch.rand(weight.shape[1], generator=g) ** 4 * 30
        h[0] = 55.0  # an outlier, as real states have
        for state in (h, h * 1e-7):
            peak = float(state.abs().max())
            estimate = probe.estimate(state, peak)
            rows, residual = probe.grid_rows(state, peak)
            on_grid = rows[0, :-2].double() + rows[1, :-2].double() / probe.half
            exact = held @ on_grid
            if not bool(((estimate.logits.double() - exact).abs() <= probe.rounding(estimate.logits, peak)).all()):
                return None
        return cls(weight)

    def grid_rows(self, h: torch.Tensor, peak: float) -> tuple[torch.Tensor, float]:
        """(the kernel's input [2, H + 2]: s1*k1 and s1*k2 with the grid's ends, the residual's largest magnitude)."""
        half = self.half
        s1 = 2.0 ** max(math.ceil(math.log2(peak / (half - 1))), self.MIN_GRID) if peak > 0 else 1.0  # |k1| < half
        k1 = torch.round(h / s1)  # h / s1, k1 * s1 and h - k1 * s1 are exact: s1 is a power of two
        rest = h - k1 * s1
        k2 = torch.round(rest * (half / s1))  # |k2| <= half / 2
        residual = float((rest - k2 * (s1 / half)).abs().max())
        rows = h.new_empty(2, self.columns + 2)
        rows[0, :-2], rows[1, :-2] = k1, k2
        rows[:, -2], rows[:, -1] = -half, half - 1
        return rows.mul_(s1), residual

    def estimate(self, h: torch.Tensor, peak: float) -> Estimate:
        rows, residual = self.grid_rows(h, peak)
        out = torch.ops.quantized.linear_dynamic(rows, self.packed, reduce_range=self.half == 64)
        logits = torch.add(out[0], out[1], alpha=1 / self.half)
        weights = 0.5 * (1 + 1e-4) * float(h.abs().sum())  # half a scale per weight (and a float32 quotient), by |h|_1
        rounding = self.rounding(logits, peak)
        widest = weights * self.largest_scale + residual * self.largest_l1 + rounding
        return Estimate(logits, lambda ids: weights * self.scale[ids] + residual * self.l1[ids] + rounding, widest)

    def rounding(self, logits: torch.Tensor, peak: float) -> float:
        """What float32's rounding of the kernel's results and of their sum may add: far below 1e-6 of the
        magnitudes they pass through."""
        return 1e-6 * (float(logits.abs().max()) + self.largest_l1 * peak) + 1e-30


HALF = dict(dtype=torch.float16, input_error=1.1e-3, output_error=5e-4, slack=1e-3, max_input=6.0e4)
BFLOAT = dict(dtype=torch.bfloat16, input_error=8e-3, output_error=4e-3, slack=1e-3, max_input=math.inf)
SCREENS = {s.name: s for s in (
    HalfScreen("float16", matrix_vector=False, **HALF),
    HalfScreen("float16 matrix-vector", matrix_vector=True, **HALF),
    HalfScreen("bfloat16", matrix_vector=False, **BFLOAT),
    HalfScreen("bfloat16 matrix-vector", matrix_vector=True, **BFLOAT),
    Int8Screen(),
)}
Screen = HalfScreen | Int8Screen
