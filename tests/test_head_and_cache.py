"""The CPU head kernels and the in-place KV layer: same numbers as transformers' own, by other routes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sortedchat import head_product, head_screens
from sortedchat.engine.state import GrowingLayer, LayeredState
from sortedchat.head_product import EXACT, MIN_SCREENED, MULTI_ROW, SCREEN, SCREENS, HeadProduct, choose_screen
from sortedchat.head_screens import Int8Copy


class Holder(nn.Module):
    def __init__(self, vocab: int = 3000, hidden: int = 48, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)


def test_head_product_matches_f_linear_for_every_row_count():
    holder = Holder()
    product = HeadProduct(holder)
    w = holder.lm_head.weight
    with torch.inference_mode():
        for rows in (1, 2, 5, 64, 65):
            h = torch.randn(1, rows, 48) * 3
            out = product(h)
            assert out.shape == (1, rows, 3000) and out.is_contiguous()
            torch.testing.assert_close(out, F.linear(h, w), rtol=1e-5, atol=1e-4)
            assert torch.equal(out.argmax(-1), F.linear(h, w).argmax(-1))


def test_head_product_is_plain_lm_head_under_autograd():
    holder = Holder()
    h = torch.randn(1, 1, 48, requires_grad=True)
    out = HeadProduct(holder)(h)
    out.sum().backward()  # the plain module: gradients reach both the input and the weight
    assert h.grad is not None and holder.lm_head.weight.grad is not None


def test_head_product_copies_follow_a_changed_weight():
    holder = Holder()
    product = HeadProduct(holder)
    h = torch.randn(1, 48)
    with torch.no_grad():
        before = product(h)
        holder.lm_head.weight.mul_(2)
        torch.testing.assert_close(product(h), 2 * before, rtol=1e-5, atol=1e-4)
        for screen in SCREENS.values():
            screened = product.screened(h, screen)
            torch.testing.assert_close(screened[0, screened.argmax()], 2 * before.max(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("screen", SCREENS.values(), ids=SCREENS.keys())
def test_every_screen_returns_the_float32_argmax(screen):
    product = HeadProduct(Holder())
    w = product.lm_head.weight
    screened_count = 0
    with torch.inference_mode():
        for seed in range(200):
            g = torch.Generator().manual_seed(seed)
            h = torch.randn(1, 1, 48, generator=g) * 4
            exact = F.linear(h, w)
            screened = product.screened(h, screen)
            if screened is None:  # a near-tie: the caller falls back to the exact product
                continue
            screened_count += 1
            assert screened.shape == exact.shape
            assert int(screened.argmax()) == int(exact.argmax())
            top = exact[0, 0].topk(SCREEN).indices
            torch.testing.assert_close(screened[0, 0, top[:1]], exact[0, 0, top[:1]], rtol=1e-5, atol=1e-4)
    assert screened_count > 150  # near-ties are rare: the screen does its work


@pytest.mark.parametrize("screen", SCREENS.values(), ids=SCREENS.keys())
def test_every_screen_settles_a_near_tie_in_float32_and_refuses_what_it_cannot_screen(screen):
    holder = Holder()
    with torch.no_grad():  # more near-equal leaders than the `SCREEN` leading estimates: all are recomputed
        for i in range(SCREEN + 4):
            holder.lm_head.weight[100 + i] = holder.lm_head.weight[3] * (1 + 1e-6 * (i + 1))
    product = HeadProduct(holder)
    w = holder.lm_head.weight
    with torch.inference_mode():
        h = w[3] / w[3].norm() * 40
        screened, exact = product.screened(h[None], screen)[0], F.linear(h, w)
        assert int(screened.argmax()) == int(exact.argmax()) == 100 + SCREEN + 3
        torch.testing.assert_close(screened[100:100 + SCREEN + 4], exact[100:100 + SCREEN + 4], rtol=1e-6, atol=0)
        assert product.screened(torch.randn(2, 48), screen) is None  # several rows: not a greedy step
        assert product.screened(torch.full((1, 48), float("nan")), screen) is None
        assert product.screened(torch.full((1, 48), float("inf")), screen) is None
        assert HeadProduct(Holder(vocab=SCREEN)).screened(torch.randn(1, 48), screen) is None  # nothing to screen
    with torch.no_grad():
        assert product.screened(torch.randn(1, 48), screen) is not None  # no autograd needed: screening applies
        w[400:1000] = w[3]  # a fifth of the vocabulary tied at the top: the full product is as cheap
        assert product.screened(h[None], screen) is None


@pytest.mark.parametrize("bits", [8, 7])
def test_the_int8_screens_bound_holds_for_every_token_and_leaves_few_candidates(monkeypatch, bits):
    """Against float64 on heads with large rows and states with an outlier, tiny or zero entries: every estimate
    lies within its bound, and the bound is tight enough to leave a handful of candidates on ordinary states. 7
    bits: a CPU whose kernel would saturate 8-bit inputs (`quantize.full_range_is_exact`)."""
    monkeypatch.setattr(head_screens, "full_range_is_exact", lambda: bits == 8)
    g = torch.Generator().manual_seed(0)
    worst, candidates = 0.0, []
    for trial in range(24):
        w = torch.randn(3000, 64, generator=g) * 0.05
        w[trial * 7] *= 40  # one row far larger than the rest
        copy = Int8Copy.of(w)
        assert copy is not None and copy.half == (128 if bits == 8 else 64)
        h = torch.randn(64, generator=g) * 3
        if trial % 3 == 1:
            h[5] = 300.0  # an outlier dimension, as a model's states have
        if trial % 3 == 2:
            h[::2] = 1e-30  # entries far below the grid
        if trial % 4 == 3:
            h *= 1e-6  # a state below the least input scale torch takes (about 6.1e-5)
        estimate = copy.estimate(h, float(h.abs().max()))
        exact = (w.double() @ h.double()).float()
        bound = estimate.bound(torch.arange(3000))
        assert float(bound.max()) <= estimate.widest * 1.0005  # as `_screened` widens it
        worst = max(worst, float(((estimate.logits - exact).abs() / bound).max()))
        best = float((estimate.logits - bound).max())
        candidates.append(int((estimate.logits + bound >= best).sum()))
    assert worst < 1
    assert sorted(candidates)[len(candidates) // 2] <= 8  # a handful of 3000 at the median
    zero = Int8Copy.of(torch.randn(100, 64, generator=g)).estimate(torch.zeros(64), 0.0)
    assert torch.equal(zero.logits, torch.zeros(100)) and zero.widest < 1e-20


def test_an_int8_copy_is_refused_where_the_kernel_would_not_see_the_grid(monkeypatch):
    """The probe catches inputs off the kernel's grid (here: without the grid's ends, the kernel chooses a scale
    of its own and rounds the input): the copy is refused, and screening falls back to the exact product."""
    rows = Int8Copy.grid_rows

    def without_ends(self, h, peak):
        grid, residual = rows(self, h, peak)
        grid[:, -2:] = 0
        return grid, residual

    monkeypatch.setattr(Int8Copy, "grid_rows", without_ends)
    w = torch.randn(300, 64)
    assert Int8Copy.of(w) is None
    with torch.inference_mode():
        assert HeadProduct(Holder()).screened(torch.randn(1, 48), SCREENS["int8"]) is None


def test_a_float16_screen_refuses_what_float16_cannot_hold_and_bfloat16_takes_it():
    product = HeadProduct(Holder())
    with torch.inference_mode():
        h = torch.randn(1, 48) * 1e5
        assert product.screened(h, SCREENS["float16"]) is None  # float16 would overflow
        big = HeadProduct(Holder())
        big.lm_head.weight.mul_(1e4)  # a state float16 holds, logits it cannot: refused, not a crash
        assert big.screened(torch.randn(1, 48) * 100, SCREENS["float16"]) is None
        screened = product.screened(h, SCREENS["bfloat16 matrix-vector"])
        assert int(screened.argmax()) == int(F.linear(h, product.lm_head.weight).argmax())


# One position of the SmolLM2 head on the Intel Xeon, 1 thread (ms; head_product's docstring)
TODAY = {EXACT: 9.0, "float16": 11.4, "float16 matrix-vector": 14.4, "bfloat16": 8.0, "bfloat16 matrix-vector": 3.2}


def test_the_chooser_keeps_the_fastest_of_the_timings_it_is_given():
    ms = TODAY
    assert choose_screen(ms) is SCREENS["bfloat16 matrix-vector"]
    assert choose_screen({**ms, "float16": 3.1}) is SCREENS["float16"]
    assert choose_screen({**ms, EXACT: 3.0}) is None  # no screen beats the exact product: none
    assert choose_screen({**ms, EXACT: 3.2}) is None  # a tie goes to the exact product


LARGE = MIN_SCREENED // 48 + 1  # the vocabulary of a head large enough to be screened


def given_timings(monkeypatch, timings: dict[str, float]) -> list[HeadProduct]:
    """A fresh choice in this process, on `timings` in place of the measured ones (the kernels still run, making
    every copy, as a real choice does); returns the heads that were timed."""
    monkeypatch.setattr(head_product, "_CHOSEN", {})
    timed, measure = [], HeadProduct.time_screens

    def time_screens(self, hidden):
        measure(self, hidden)
        timed.append(self)
        return timings

    monkeypatch.setattr(HeadProduct, "time_screens", time_screens)
    return timed


def test_the_head_times_the_screens_once_per_process_and_screens_with_the_fastest(monkeypatch):
    timed = given_timings(monkeypatch, TODAY)
    h = torch.randn(1, 48)
    with torch.inference_mode():
        first, second = HeadProduct(Holder(vocab=LARGE)), HeadProduct(Holder(vocab=LARGE, seed=1))
        for product in (first, second, first):
            w = product.lm_head.weight
            screened = product.screened(h)[0]
            approx = (w.bfloat16() @ h[0].bfloat16()).float()  # the bfloat16 copy's estimates
            others = torch.ones_like(approx, dtype=torch.bool)
            others[approx.topk(SCREEN).indices] = False
            assert torch.equal(screened[others], approx[others])
            assert int(screened.argmax()) == int(F.linear(h, w).argmax())
        assert timed == [first]  # one choice for every head of this shape in the process
        assert torch.bfloat16 in first._copies and torch.float16 not in first._copies  # the other copy let go


def test_the_head_falls_back_to_the_exact_product_where_no_screen_is_faster(monkeypatch):
    given_timings(monkeypatch, {**TODAY, EXACT: 3.0})
    product = HeadProduct(Holder(vocab=LARGE))
    with torch.inference_mode():
        assert product.screened(torch.randn(1, 48)) is None  # the caller uses the exact product
        assert not any(isinstance(name, torch.dtype) for name in product._copies)  # no half-precision copy kept


def test_a_screen_that_cannot_hold_the_timed_state_is_not_timed():
    """float16 cannot hold a state past 6e4: its screen would return at once, unscreened, and seem fastest."""
    product = HeadProduct(Holder(vocab=LARGE))
    with torch.inference_mode():
        timed = product.time_screens(torch.full((1, 48), 1e5))
    assert set(timed) == {EXACT, "bfloat16", "bfloat16 matrix-vector", "int8"}


def test_a_small_head_is_not_screened_nor_timed(monkeypatch):
    timed = given_timings(monkeypatch, TODAY)
    with torch.inference_mode():
        assert HeadProduct(Holder()).screened(torch.randn(1, 48)) is None
    assert timed == []


@pytest.mark.parametrize("fastest", MULTI_ROW)
def test_several_rows_go_through_the_kernel_timed_fastest_here_and_give_float32s_logits(monkeypatch, fastest):
    """Verification's rows (2..MAX_ROWS): each `MULTI_ROW` kernel is float32's product; the head times them once per
    process and uses the faster (timings injected, the kernels still run)."""
    monkeypatch.setattr(head_product, "_MULTI_CHOSEN", {})
    timed, measure = [], HeadProduct.time_multi_row

    def time_multi_row(self, rows):
        timed.append({name: seconds > 0 for name, seconds in measure(self, rows).items()})
        return {name: 1.0 if name == fastest else 2.0 for name in MULTI_ROW}

    monkeypatch.setattr(HeadProduct, "time_multi_row", time_multi_row)
    product = HeadProduct(Holder(vocab=LARGE))
    w = product.lm_head.weight
    with torch.inference_mode():
        for rows in (2, 5, 2):
            h = torch.randn(1, rows, 48) * 3
            out = product(h)
            torch.testing.assert_close(out, F.linear(h, w), rtol=1e-5, atol=1e-4)
            assert torch.equal(out, MULTI_ROW[fastest](product, h[0])[None])
    assert timed == [{name: True for name in MULTI_ROW}]  # timed once, every kernel run
    assert product.multi_row_kernel(h[0]) == fastest
    assert HeadProduct(Holder()).multi_row_kernel(h[0]) == next(iter(MULTI_ROW))  # a small head: not timed


def test_growing_layer_matches_dynamic_layer_through_updates_and_crops():
    grown, plain = GrowingLayer(), __import__("transformers").cache_utils.DynamicLayer()
    g = torch.Generator().manual_seed(0)
    for step, (q, crop) in enumerate([(5, 0), (1, 0), (70, 0), (1, 3), (2, 0), (1, 80), (4, 0)]):
        k, v = torch.randn(1, 2, q, 8, generator=g), torch.randn(1, 2, q, 8, generator=g)
        a, b = grown.update(k, v), plain.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), step
        if crop:
            grown.crop(-crop)
            plain.crop(-crop)
            assert grown.get_seq_length() == plain.get_seq_length()


def test_layered_state_uses_growing_layers(tiny):
    state = LayeredState(tiny)
    assert all(type(layer) is GrowingLayer for layer in state.cache.layers)


def test_the_costs_time_the_head_as_a_greedy_step_runs_it(tiny, monkeypatch):
    """The head's cost in `measure_costs` is the head a greedy step runs (its screen, where one pays), on the state
    a session decodes with."""
    from sortedchat.bench import costs
    from sortedchat.sorted_model import SortedModel

    calls, head = [], SortedModel.head

    def recorded(sm, hidden, exit_layer, greedy=False):
        calls.append((exit_layer, greedy))
        return head(sm, hidden, exit_layer, greedy)

    monkeypatch.setattr(SortedModel, "head", recorded)
    sessions = []

    class Recorded(costs.ChatSession):
        def __init__(self, sm):
            super().__init__(sm)
            sessions.append(self)

    monkeypatch.setattr(costs, "ChatSession", Recorded)
    measured = costs.measure_costs(tiny, context=16, measures={}, inner=1, rounds=1)
    assert measured.head > 0 and (tiny.num_layers, True) in calls
    assert len(sessions) == 1 and sessions[0].state.length == 16  # timed on a session's state, left at the context
