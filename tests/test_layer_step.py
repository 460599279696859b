"""The engine's own decoder-layer step against transformers' layers: the same numbers, bit for bit, in every
way the engine runs a layer; a layer it does not know goes through transformers."""

from __future__ import annotations

import torch

from sortedchat.engine import ChatSession
from sortedchat.engine.layer_step import LayerStep, TransformersCall
from sortedchat.engine.state import LayeredState, LayerSteps, RotaryTable
from sortedchat.loading import LoadOptions, load_sorted_model

from helpers.engine import PROMPTS, hf_greedy, no_stop, prompt_ids, run


def through_transformers(state: LayeredState) -> LayeredState:
    """`state` with every layer called through transformers (the reference path)."""
    state.steps = LayerSteps(TransformersCall(layer, state.cache) for layer in state.sm.layers)
    return state


def assert_same(a: LayeredState, b: LayeredState) -> None:
    assert a.kv_len == b.kv_len
    for i in range(a.num_layers):
        for kind in ("keys", "values"):
            assert torch.equal(getattr(a.cache.layers[i], kind), getattr(b.cache.layers[i], kind)), (i, kind)
        assert (a.waiting[i] is None) == (b.waiting[i] is None)
        assert a.waiting[i] is None or torch.equal(a.waiting[i], b.waiting[i])


def test_own_steps_compute_what_transformers_layers_compute_bit_for_bit(tiny):
    """A prompt, tokens at depths 2 and 4 leaving backlogs, a drain of several positions to full depth, a crop
    (a rejected draft) and propagated K/V: every output, K/V and waiting state is identical."""
    ids = prompt_ids(tiny, PROMPTS[2])
    own, ref = LayeredState(tiny), through_transformers(LayeredState(tiny))
    assert own.steps.all_own and all(type(s) is LayerStep for s in own.steps)
    plan = [(6, ids[:-1]), (2, [ids[-1]]), (2, [7]), (4, [9]), (6, [11]), (6, None), (3, [5]), ("crop", 12),
            (2, [8]), ("propagate", None), (6, [4, 6, 2]), (1, [3])]
    for depth, new in plan:
        if depth == "crop":
            own.crop(new), ref.crop(new)
        elif depth == "propagate":
            assert own.propagate() == ref.propagate() > 0
        else:
            a, b = own.run(depth, new), ref.run(depth, new)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (depth, new)
        assert_same(own, ref)
        own.check_invariants()


def test_a_layer_that_computes_something_else_is_called_through_transformers(tiny_dir):
    """A decoder layer whose MLP computes otherwise than LLaMA's fails the probe: that layer alone goes through
    transformers, and full depth still equals transformers' greedy answer."""
    sm = load_sorted_model(str(tiny_dir), LoadOptions(device="cpu", exits=[2, 4, 6]))
    mlp = sm.layers[3].mlp
    mlp.forward = lambda x: type(mlp).forward(mlp, x) * 1.5
    session = no_stop(ChatSession(sm))
    steps = session.state.steps
    assert [type(s) for s in steps] == [LayerStep] * 3 + [TransformersCall] + [LayerStep] * 2
    assert not steps.all_own
    ids = prompt_ids(sm, PROMPTS[0])
    assert run(session, ids, n=12) == hf_greedy(sm, ids, 12)


def test_rotary_table_slices_hold_what_the_rotary_module_computes(tiny):
    table = RotaryTable(tiny)
    like = torch.zeros(1, 1, tiny.model.config.hidden_size)
    with torch.inference_mode():
        for first, end in ((0, 1), (5, 9), (250, 251), (300, 700)):
            got = table.span(like, first, end)
            want = tiny.rotary(like, torch.arange(first, end)[None])
            assert all(torch.equal(g, w) for g, w in zip(got, want)), (first, end)
