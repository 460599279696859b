"""Propagated K/V (`--kv propagate`, CALM's copy): which positions hold approximate K/V, and that all the others
hold what the layers compute for the K/V stored before them, in every mode and across switches."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from sortedchat import SortedChatError
from sortedchat.engine import ChatSession, Mode, ModeKind, SamplingConfig
from sortedchat.engine.state import LayeredState
from sortedchat.hf_contract import cache_keyword

from helpers.engine import PROMPTS, hf_greedy, no_stop, prompt_ids, run


@torch.inference_mode()
def reference(sm, tokens: list[int], filled_by: list[int]):
    """A direct computation, one position at a time with transformers' own layers: position p runs through
    layers 1..filled_by[p]; every layer above stores the K/V that the layer's real forward stores for the
    hidden state leaving layer filled_by[p] (read from a scratch cache, so nothing of the engine is reused).
    Returns the cache and each position's prediction from the exit it stopped at."""
    L = sm.num_layers
    cache = DynamicCache(config=sm.model.config)
    predictions = []
    for p, (token, filled) in enumerate(zip(tokens, filled_by)):
        h = sm.embed(torch.tensor([[token]]))
        positions = torch.tensor([[p]])
        rope = sm.rotary(h, positions)
        for i in range(L):
            keyword = cache_keyword(type(sm.layers[i]))  # the layer's name for its KV cache in this transformers
            if i < filled:
                h = sm.layers[i](h, position_ids=positions, use_cache=True, position_embeddings=rope,
                                 **{keyword: cache})
            else:
                scratch = DynamicCache(config=sm.model.config)
                sm.layers[i](h, position_ids=positions, use_cache=True, position_embeddings=rope, **{keyword: scratch})
                cache.update(scratch.layers[i].keys, scratch.layers[i].values, i)
        predictions.append(int(sm.head(h[:, -1], filled).argmax()))
    return cache, predictions


def assert_kv_equal(state: LayeredState, cache: DynamicCache, upto: int | None = None) -> None:
    for i in range(state.num_layers):
        n = state.kv_len[i] if upto is None else upto
        mine, ref = state.cache.layers[i], cache.layers[i]
        torch.testing.assert_close(mine.keys[..., :n, :], ref.keys[..., :n, :], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mine.values[..., :n, :], ref.values[..., :n, :], rtol=1e-4, atol=1e-4)


def test_without_early_exits_propagate_equals_exact(tiny):
    """Nothing skips a layer: propagation has nothing to do, and the answer is the full model's."""
    ids = prompt_ids(tiny, PROMPTS[0])
    expected = hf_greedy(tiny, ids, 24)
    for mode in (Mode.auto(threshold=1.0, kv="propagate"), Mode.fixed(kv="propagate")):
        session = no_stop(ChatSession(tiny, mode))
        assert run(session, ids) == expected
        assert session.state.kv_fills == 0 and session.last_stats.kv_fills == 0
        assert set(session.state.filled_by) == {tiny.num_layers}


def test_propagated_positions_hold_the_projections_of_the_exit_state_and_the_rest_what_layers_compute(tiny):
    L = tiny.num_layers
    ids = prompt_ids(tiny, PROMPTS[1])
    state = LayeredState(tiny)
    with torch.inference_mode():
        state.run(L, ids[:-1])
        n_prompt = state.length
        prefill = tiny.model(input_ids=torch.tensor([ids[:-1]]), use_cache=True).past_key_values
        steps = [(2, True), (4, True), (3, False), (2, False), (L, False), (1, True), (5, False), (2, True), (L, True)]
        for (depth, propagate), token in zip(steps, ids[-1:] + [11, 12, 13, 14, 15, 16, 17, 18]):
            state.run(depth, [token])
            if propagate:
                state.propagate()
                assert len(set(state.kv_len)) == 1 and not any(w is not None for w in state.waiting)
            state.check_invariants()
    # The prompt, before anything was propagated, is a full prefill's; positions left at 3 and 2 without
    # propagation were drained by the exact full-depth token after them, then the backlog at 5 by the last one.
    assert state.filled_by[:n_prompt] == [L] * n_prompt
    assert state.filled_by[n_prompt:] == [2, 4, L, L, L, 1, 5, 2, L]
    assert state.kv_fills == (L - 2) + (L - 4) + (L - 1) + (L - 5) + (L - 2)
    for i in range(L):
        torch.testing.assert_close(state.cache.layers[i].keys[..., :n_prompt, :], prefill.layers[i].keys)
    cache, _ = reference(tiny, state.tokens, state.filled_by)
    assert_kv_equal(state, cache)


def test_switching_between_exact_and_propagate_mid_answer(tiny):
    """Every token, the mode changes (auto/fixed depth, exact/propagate, shallow/full): the invariants hold after
    each one, every token is the prediction of its exit for the K/V it saw, and switching to exact re-runs
    nothing: a full-depth token after propagated ones runs each layer over that token only."""
    L = tiny.num_layers
    schedule = [
        Mode.auto(threshold=0.0, kv="propagate"),  # every token leaves at the first exit (2)
        Mode.fixed(4),
        Mode.fixed(L),  # drains the backlog at 5..6 left by depth 4
        Mode.auto(threshold=0.0, kv="propagate"),
        Mode.fixed(L),  # exact right after a propagated token: nothing to drain
        Mode.fixed(2),
        Mode.fixed(4, kv="propagate"),  # propagates the backlog left at 3..6 by depth 2, and its own token
        Mode.auto(threshold=0.0),
        Mode.fixed(L, kv="propagate"),  # runs the backlog auto left at 3..6 (exact), then its own token
    ]
    session = no_stop(ChatSession(tiny, schedule[0]))
    ids = prompt_ids(tiny, PROMPTS[0])
    exits, evals, answer = [], [], []
    events = session.generate_ids(ids, SamplingConfig(max_new_tokens=len(schedule)))
    for k, ev in enumerate(events):
        session.state.check_invariants()
        exits.append(ev.exit_layer)
        answer.append(ev.token_id)
        evals.append(session.state.layer_evals)
        if k + 1 < len(schedule):
            session.mode = schedule[k + 1]
    assert exits == [2, 4, L, 2, L, 2, 4, 2, L]
    assert evals[4] - evals[3] == L  # the exact full-depth token after a propagated one: its own position only
    state = session.state
    n = len(ids)
    assert state.filled_by[n - 1 :] == [2, L, L, 2, L, 4, 4, L, L]  # the position fed at each step
    cache, predictions = reference(tiny, state.tokens, state.filled_by)
    assert_kv_equal(state, cache)
    # Each answer token is what its exit predicts from the K/V the position saw. (Positions whose backlog was
    # drained later have filled_by L but were predicted at their exit: check those against the exit's head.)
    for k, (token, exit_layer) in enumerate(zip(answer, exits)):
        p = n - 1 + k
        if state.filled_by[p] == exit_layer:
            assert predictions[p] == token, (k, exit_layer)


def test_speculative_needs_exact_kv(tiny):
    with pytest.raises(SortedChatError, match="speculative decoding needs exact K/V"):
        Mode(kind="speculative", depth=2, kv="propagate").validate(tiny.num_layers)
    with pytest.raises(SortedChatError, match="unknown K/V way 'copy'"):
        Mode.fixed(kv="copy").validate(tiny.num_layers)


def test_label_shows_propagated_kv(tiny):
    assert Mode.auto(kv="propagate").label(6) == "Auto · propagated KV"
    assert Mode.fixed(4).label(6) == "Depth 4/6"


def test_ask_kv_propagate_fills_the_skipped_layers_of_every_token(tiny_dir):
    import json

    from typer.testing import CliRunner

    from sortedchat.cli import app

    res = CliRunner().invoke(app, ["ask", "Hello!", "--model", str(tiny_dir), "--device", "cpu", "--depth", "2",
                                   "--kv", "propagate", "-n", "5", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.splitlines()[-1])
    tokens = summary["tokens"]
    assert summary["mean_exit"] == 2.0 and summary["kv_fills"] == 4 * tokens  # layers 3..6 of every token
    share = summary["kv_fill_share"]
    assert 0 < share < 0.5 and summary["compute_saved"] == pytest.approx(1 - (2 + 4 * share) / 6)


@pytest.mark.parametrize("args, error", [
    (["--kv", "copy"], "--kv copy: choose exact or propagate"),
    (["--speculative", "2", "--kv", "propagate"],
     "--kv propagate: speculative decoding needs exact K/V (its output is the full model's)"),
])
def test_ask_kv_errors(tiny_dir, args, error):
    from typer.testing import CliRunner

    from sortedchat.cli import app

    res = CliRunner().invoke(app, ["ask", "Hi", "--model", str(tiny_dir), "--device", "cpu", *args])
    assert res.exit_code == 1 and str(res.exception) == error


def test_refill_stores_what_leaving_at_the_exit_and_propagating_would(tiny):
    """Calibration runs a position through every layer, then makes it look as if it had left at exit e."""
    ids = prompt_ids(tiny, PROMPTS[2])
    a, b = LayeredState(tiny), LayeredState(tiny)
    with torch.inference_mode():
        for state in (a, b):
            state.run(tiny.num_layers, ids[:-2])
        hidden = a.run(2, ids[-2:-1])[:, -1:]
        a.propagate()
        outputs = [b.run(e, ids[-2:-1] if e == 2 else None) for e in (2, 4, 6)]
        torch.testing.assert_close(outputs[0][:, -1:], hidden)
        b.refill(2, outputs[0][:, -1:])
        for state in (a, b):
            state.run(tiny.num_layers, ids[-1:])  # the next token sees the refilled K/V
            state.check_invariants()
    assert a.filled_by == b.filled_by and b.filled_by[-2] == 2
    for i in range(tiny.num_layers):
        torch.testing.assert_close(a.cache.layers[i].keys, b.cache.layers[i].keys)
        torch.testing.assert_close(a.cache.layers[i].values, b.cache.layers[i].values)


# -- calibration under propagation ------------------------------------------------------------------------
def test_propagated_cost_model_has_no_drain_and_pays_the_projections():
    import dataclasses

    from sortedchat import calibrate as cal
    from sortedchat.bench.costs import Costs

    agree2 = torch.tensor([True] * 6 + [False] * 4)
    conf = torch.stack([torch.where(agree2, 0.9, 0.2), torch.full((10,), 0.3)])
    agree = torch.stack([agree2, torch.zeros(10, dtype=torch.bool)])
    exact = Costs(layer=1.0, head=2.0, step=0.0, context=0, drain=1.0, kv_fill=0.1, check={"m": 0.01},
                  per_token={"m": 0.0})
    assert cal.thresholds_for_precision(conf, agree, [2, 4], 0.9, exact, "m", 6) == [1.0, 1.0]  # all drained
    propagate = dataclasses.replace(exact, kv="propagate")
    th = cal.thresholds_for_precision(conf, agree, [2, 4], 0.9, propagate, "m", 6)
    assert th[0] == pytest.approx(0.9) and th[1] == 1.0
    sim = cal.simulate(conf, agree, [2, 4], th, propagate, "m", 6)
    assert sim["speedup"] == pytest.approx(8 / (0.6 * (8 - 4 * (1.0 - 0.1)) + 0.4 * 8 + 0.01))
    # Where the last exit disagrees (the K/V it saw were propagated), tokens that reach it count as disagreeing.
    last = torch.tensor([True] * 9 + [False])
    assert cal.simulate(conf, agree, [2, 4], th, propagate, "m", 6, agree_last=last)["agreement"] == pytest.approx(0.9)


def test_observe_propagated_records_what_a_propagated_run_chooses(tiny):
    """With every token leaving at exit 2, exit 2's agreement at each position is exactly whether auto mode with
    propagated K/V, fed the same answer, picks the exact model's token; without early exits it is the one-pass
    (exact) observation, and the last exit always agrees."""
    from sortedchat import calibrate as cal
    from sortedchat.engine.confidence import make_measure

    prompts = [prompt_ids(tiny, PROMPTS[i % 3]) for i in range(4)]
    sequences = [(p + [40 + i, 50, 60 + i, 70, 80], len(p) - 1) for i, p in enumerate(prompts)]
    maxprob = make_measure("maxprob", tiny)
    obs = cal.observe_propagated(tiny, sequences, maxprob, [0.0, 1.0])
    assert obs.exit_at.tolist() == [2] * obs.agree.shape[1] and obs.exits == [2, 4]
    expected = []
    for ids, start in sequences:
        reference = tiny.model(input_ids=torch.tensor([ids])).logits[0].argmax(-1)[start:-1].tolist()
        session = no_stop(ChatSession(tiny, Mode.auto(threshold=0.0, kv="propagate")))
        events = session.generate_ids(ids[: start + 1], SamplingConfig(), forced=ids[start + 1 :])
        chosen = [ev.token_id for ev in events]
        expected += [a == b for a, b in zip(chosen, reference)]
    assert obs.agree[0].tolist() == expected

    exact, none_leave = cal.observe(tiny, sequences), cal.observe_propagated(tiny, sequences, maxprob, [1.0, 1.0])
    assert none_leave.agree_last.all() and none_leave.exit_at.tolist() == [6] * exact.agree.shape[1]
    assert torch.equal(none_leave.agree, exact.agree)
    propagated, one_pass = none_leave.records, exact.records
    torch.testing.assert_close(propagated["maxprob"], one_pass["maxprob"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(propagated["saturation"], one_pass["saturation"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(propagated["subset"], one_pass["subset"], rtol=1e-3, atol=1e-4)


def test_calibrate_kv_propagate_writes_figures_measured_under_propagation(monkeypatch, tiny_dir, tmp_path, capsys):
    import json
    import shutil
    import sys

    from sortedchat.cli import main

    from helpers.data import CALIBRATION_RECORDS

    model_dir, data = tmp_path / "tiny", tmp_path / "held_out.json"
    shutil.copytree(tiny_dir, model_dir)
    data.write_text(json.dumps(CALIBRATION_RECORDS))
    monkeypatch.setattr(sys, "argv", ["sortedchat", "calibrate", "--model", str(model_dir), "--data", str(data),
                                      "--device", "cpu", "--exits", "2,4,6", "--measure", "subset", "--kv",
                                      "propagate"])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr().out
    assert exc.value.code in (0, None), out
    flat = " ".join(out.split())
    assert "auto mode, propagate K/V, at target agreement 95% (held-out, teacher-forced with propagated K/V" in flat
    assert "started from the one-pass (exact K/V) plan of subset" in flat
    written = json.loads((model_dir / "sortedchat.json").read_text())
    assert written["calibration"]["kv"] == "propagate" and written["confidence"] == "subset"
    assert written["calibration"]["costs_ms"]["kv_fill"] >= 0
    assert set(written["calibration"]["expected"]) == {"subset"}  # no exact-K/V figures beside it
    per_exit = written["calibration"]["per_exit"]
    assert 0.0 < written["calibration"]["expected"]["subset"]["agreement"] <= 1.0
    assert sum(v["share"] for v in per_exit.values()) <= 1.0 and set(per_exit) == {"2", "4"}


def test_calibrate_kv_must_be_exact_or_propagate():
    from sortedchat import calibrate as cal

    with pytest.raises(SortedChatError, match="--kv copy: choose exact or propagate"):
        cal.check_options(0.95, None, 10, "copy")


def test_app_kv_key_switches_propagation_and_the_status_shows_it(tiny, tmp_path):

    from helpers.tui import SIZE, ask, dialogue, make_app, run_async, status

    app = make_app(tiny, tmp_path)

    @run_async
    async def run():
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("f4", "f12")  # auto, propagated K/V
            talk = dialogue(app)
            assert talk.session.mode.kind is ModeKind.AUTO and talk.session.mode.kv == "propagate"
            assert "Auto · propagated KV" in status(app)
            for _ in range(20):  # every threshold to 0: every token leaves at exit 2, layers 3..6 propagated
                await pilot.press("f6")
            await ask(pilot, app)
            assert talk.events and {e.exit_layer for e in talk.events} == {2}
            assert talk.session.last_stats.kv_fills == 4 * len(talk.events)
            assert 2 in talk.session.state.filled_by
            await pilot.press("f5")  # speculative keeps exact K/V; the choice comes back with fixed depth
            assert talk.session.mode.kind is ModeKind.SPECULATIVE and talk.session.mode.kv == "exact"
            assert "propagated KV" not in status(app)
            await pilot.press("f5")
            assert talk.session.mode == Mode.fixed(2, kv="propagate") and "Depth 2/6 · propagated KV" in status(app)
            await pilot.press("f12")
            assert talk.session.mode == Mode.fixed(2) and "propagated KV" not in status(app)
