"""The CPU head kernels and the in-place KV layer: same numbers as transformers' own, by other routes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sortedchat.engine.state import GrowingLayer, LayeredState
from sortedchat.head_product import SCREEN, HeadProduct


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
        torch.testing.assert_close(product.screened(h)[0, product.screened(h).argmax()], 2 * before.max(), rtol=1e-5,
                                   atol=1e-4)


def test_screened_head_returns_the_float32_argmax():
    holder = Holder()
    product = HeadProduct(holder)
    w = holder.lm_head.weight
    with torch.inference_mode():
        for seed in range(200):
            g = torch.Generator().manual_seed(seed)
            h = torch.randn(1, 1, 48, generator=g) * 4
            exact = F.linear(h, w)
            screened = product.screened(h)
            if screened is None:  # a near-tie: the caller falls back to the exact product
                continue
            assert screened.shape == exact.shape
            assert int(screened.argmax()) == int(exact.argmax())
            top = exact[0, 0].topk(SCREEN).indices
            torch.testing.assert_close(screened[0, 0, top[:1]], exact[0, 0, top[:1]], rtol=1e-5, atol=1e-4)


def test_screened_head_refuses_a_near_tie_and_rows_it_cannot_screen():
    holder = Holder()
    with torch.no_grad():  # more near-equal leaders than the screen recomputes: the bound cannot separate them
        for i in range(SCREEN + 1):
            holder.lm_head.weight[100 + i] = holder.lm_head.weight[3] * (1 + 1e-6 * i)
    product = HeadProduct(holder)
    w = holder.lm_head.weight
    with torch.inference_mode():
        h = w[3] / w[3].norm() * 40
        assert product.screened(h[None]) is None
        assert product.screened(torch.randn(2, 48)) is None  # several rows: not a greedy step
        assert product.screened(torch.full((1, 48), 1e5)) is None  # float16 would overflow
        assert HeadProduct(Holder(vocab=SCREEN)).screened(torch.randn(1, 48)) is None  # nothing left to screen
    with torch.no_grad():
        assert product.screened(torch.randn(1, 48)) is not None  # no autograd needed: screening applies


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
