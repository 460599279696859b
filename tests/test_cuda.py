"""The engine, training and the app on a GPU's device and dtypes.

Cases on CUDA carry the `cuda` marker and skip where no CUDA device is present; `benchmarks/gpu/run.sh`
runs them on the borrowed GPU machine (`python -m pytest -m cuda`). The bfloat16 cases also run on the CPU,
so that their checks and tolerances are proven here before any GPU minute is spent.

Tolerances calibrate themselves: two computations of the same bfloat16 model with other batch shapes or
kernels (a token's prefill against its decoding step, a speculative verification against one position at
a time) round differently, by about as much as bfloat16 differs from float32. So a bfloat16 K/V may differ
from a fresh prefill's by at most twice the prefill's own distance from a float32 copy of the same weights,
and a bfloat16 greedy answer may leave the reference only where the two tokens' float32 logits lie within
twice that rounding (a near tie, after which the answers go separate ways and are not compared). A float32
model must match to within float32 round-off: the same tokens, and the K/V tolerance of the CPU tests.
"""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from rich.console import Console

from sortedchat.engine import ChatSession, Mode, SamplingConfig
from sortedchat.engine.compiled import compile_steps
from sortedchat.head_product import HeadProduct
from sortedchat.loading import LoadOptions, load_sorted_model, resolve_dtype

from helpers.engine import PROMPTS, count_graph_calls, fresh_prefill_kv, hf_greedy, no_stop, prompt_ids, run
from helpers.training import options

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def on_cuda(value, id: str):
    return pytest.param(value, marks=[pytest.mark.cuda, NO_CUDA], id=id)


ENGINE_TARGETS = [on_cuda(("cuda", "float32"), "cuda-float32"), on_cuda(("cuda", "bfloat16"), "cuda-bfloat16"),
                  pytest.param(("cpu", "bfloat16"), id="cpu-bfloat16")]
TRAIN_DEVICES = [on_cuda("cuda", "cuda"), pytest.param("cpu", id="cpu")]
FLOAT32_ROUNDOFF = 1e-4  # relative to the largest value compared (the CPU tests' K/V tolerance at |v| ~ 1)


@pytest.fixture(scope="module", params=ENGINE_TARGETS)
def sm(request, tiny_dir):
    device, dtype = request.param
    return load_sorted_model(str(tiny_dir), LoadOptions(device=device, dtype=dtype, exits=[2, 4, 6]))


_float32_copies: dict[int, torch.nn.Module] = {}


def float32_copy(sm):
    """The same weights in float32 on the same device: the reference that both roundings are measured from."""
    if id(sm) not in _float32_copies:
        _float32_copies[id(sm)] = copy.deepcopy(sm.model).float().eval()
    return _float32_copies[id(sm)]


@torch.inference_mode()
def last_logits(model, ids):
    return model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1].float()


def assert_greedy_matches(sm, prompt, got, ref):
    """`got` is `ref` up to a near tie (module docstring); returns how many tokens were compared."""
    i = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
    if i is None:
        assert len(got) == len(ref)
        return len(ref)
    seq = prompt + ref[:i]
    exact = last_logits(float32_copy(sm), seq)
    rounding = float((last_logits(sm.model, seq) - exact).abs().max())
    margin = abs(float(exact[ref[i]] - exact[got[i]]))
    allowed = 2 * rounding + FLOAT32_ROUNDOFF * float(exact.abs().max())
    assert margin <= allowed, (
        f"token {i}: {got[i]} instead of {ref[i]}, whose float32 logits differ by {margin:.4f}: more than "
        f"{allowed:.4f}, twice what {sm.dtype} rounding moves them here"
    )
    return i


def test_the_model_lands_on_the_device_and_dtype_asked_for(sm, tiny_dir):
    device, dtype = sm.device.type, sm.dtype
    assert {p.device.type for p in sm.model.parameters()} == {device}
    assert {p.dtype for p in sm.model.parameters()} == {dtype}
    if device == "cuda":  # "auto" is bfloat16 on a GPU that has it
        auto = load_sorted_model(str(tiny_dir), LoadOptions(device="cuda", exits=[2, 4, 6]))
        assert auto.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


# on the CPU, at one thread, the library test_compiled.py compiled for bfloat16 is loaded rather than compiled again
@pytest.mark.usefixtures("one_thread", "shared_libraries")
def test_the_compiled_step_answers_what_the_eager_one_does(sm, monkeypatch):
    """`--compile` on the device and dtype (its library compiled for them): the graph runs every decoding step, and
    greedy answers leave the eager engine's only at a near tie."""
    compiled = copy.deepcopy(sm)
    assert compile_steps(compiled) is None
    calls = count_graph_calls(compiled, monkeypatch)
    ids = prompt_ids(sm, PROMPTS[0])
    assert_greedy_matches(sm, ids, run(no_stop(ChatSession(compiled)), ids), run(no_stop(ChatSession(sm)), ids))
    assert calls[0] >= 23 * compiled.num_layers


@pytest.mark.parametrize("messages", PROMPTS)
def test_full_depth_equals_hf_generate(sm, messages):
    ids = prompt_ids(sm, messages)
    assert_greedy_matches(sm, ids, run(no_stop(ChatSession(sm)), ids), hf_greedy(sm, ids, 24))


@pytest.mark.parametrize("draft, draft_len", [(1, 3), (2, 6), (5, 1)])
def test_speculative_greedy_equals_full_greedy(sm, draft, draft_len):
    compared = 0
    for messages in PROMPTS:
        ids = prompt_ids(sm, messages)
        full = run(no_stop(ChatSession(sm)), ids)
        spec = no_stop(ChatSession(sm, Mode.speculative(draft, draft_len=draft_len, pace=False)))
        compared += assert_greedy_matches(sm, ids, run(spec, ids), full)
        assert spec.last_stats.verifications > 0
    assert compared >= len(PROMPTS)  # some drafting was checked before any near tie


def test_a_divergence_away_from_a_near_tie_fails_the_check(sm):
    """The near-tie allowance does not excuse a wrong token: depth 2's answer is not the full model's."""
    ids = prompt_ids(sm, PROMPTS[0])
    full = run(no_stop(ChatSession(sm)), ids, n=12)
    shallow = run(no_stop(ChatSession(sm, Mode.fixed(2))), ids, n=12)
    with pytest.raises(AssertionError, match="more than .* twice what"):
        assert_greedy_matches(sm, ids, shallow, full)


def test_kv_after_mixed_depths_and_modes_matches_a_fresh_prefill(sm):
    """Tokens at depths 2, 6, 4, auto and speculative; then the next full-depth token drains the backlog, and
    every layer's K/V is the full model's."""
    ids = prompt_ids(sm, PROMPTS[2])
    session = no_stop(ChatSession(sm, Mode.fixed(2)))
    plan = [Mode.fixed(2), Mode.fixed(6), Mode.fixed(4), Mode.auto(0.3), Mode.speculative(2, 3), Mode.fixed(1)]
    tokens = list(ids)
    for i, ev in enumerate(session.generate_ids(ids, SamplingConfig(max_new_tokens=30))):
        tokens.append(ev.token_id)
        session.mode = plan[(i // 5) % len(plan)]
    state = session.state
    assert state.kv_len[0] > state.kv_len[-1]  # shallow tokens left a backlog
    with torch.inference_mode():
        state.run(sm.num_layers, [tokens[-1]])
    state.check_invariants()
    with torch.inference_mode():
        ref, exact = fresh_prefill_kv(sm, tokens), fresh_prefill_kv(float32_copy(sm), tokens)
    for i in range(sm.num_layers):
        for kind in ("keys", "values"):
            got, want, true = (getattr(c.layers[i], kind).float() for c in (state.cache, ref, exact))
            rounding = float((want - true).abs().max())
            allowed = 2 * rounding + FLOAT32_ROUNDOFF * float(true.abs().max())
            assert float((got - want).abs().max()) <= allowed, (i, kind, rounding)


def test_no_cpu_head_kernel_off_a_float32_cpu_model(sm):
    """The head's CPU kernels (column-major copy, float16 screen) are for float32 on a CPU only: a GPU or a
    bfloat16 model runs its own `lm_head`, and no copy of the head is made."""
    ids = prompt_ids(sm, PROMPTS[0])
    events = list(no_stop(ChatSession(sm)).generate_ids(ids, SamplingConfig(max_new_tokens=6)))
    assert len(events) == 6
    product = sm.head_product
    hidden = torch.randn(1, 1, sm.model.config.hidden_size, device=sm.device, dtype=sm.dtype)
    with torch.inference_mode():
        assert product.screened(hidden) is None
        torch.testing.assert_close(product(hidden), sm.model.lm_head(hidden), rtol=0, atol=0)
    assert product._copies == {}


def test_head_kernels_stay_off_for_weights_on_any_other_device():
    """The same guard without a GPU: weights on the meta device (no data) take the plain module's route."""
    holder = torch.nn.Module()
    holder.lm_head = torch.nn.Linear(48, 3000, bias=False, device="meta")
    product = HeadProduct(holder)
    with torch.inference_mode():
        hidden = torch.empty(1, 1, 48, device="meta")
        assert product.screened(hidden) is None
        assert product(hidden).device.type == "meta"
    assert product._copies == {}


def test_auto_dtype_is_bfloat16_on_a_gpu_that_has_it_and_float16_otherwise(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", cuda) == torch.float16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float32", cuda) == torch.float32  # asked for: kept


def test_cost_timing_waits_for_the_device_before_reading_the_clock(monkeypatch):
    """Kernels on a GPU run after the call returns: every clock reading of `bench.costs` follows a synchronize."""
    from sortedchat.bench import costs

    log = []
    clock = iter(range(1000))
    seconds = costs._median_seconds(lambda: log.append("work"), inner=2, rounds=3,
                                    clock=lambda: log.append("clock") or next(clock), sync=lambda: log.append("sync"))
    assert seconds == 0.5  # each round reads two consecutive clock values around two calls
    assert log == ["sync", "clock", "work", "work", "sync", "clock"] * 3
    assert costs.device_sync(torch.device("cpu")) is costs.no_sync


def test_status_line_names_an_accelerator_and_leaves_the_cpu_unsaid():
    from sortedchat.tui.widgets.status import fit_parts, status_parts

    on_gpu, on_cpu = (fit_parts(status_parts("tiny", "Depth 6/6", None, device=d)).split(" · ")
                      for d in ("cuda:0", "cpu"))
    assert "cuda:0" in on_gpu and on_cpu == [p for p in on_gpu if p != "cuda:0"]


# -- training ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", TRAIN_DEVICES)
@pytest.mark.parametrize("kind", ["soft", "lora", "qlora"])
def test_bf16_training_steps_lower_every_exit_and_the_result_generates(device, kind, tiny_dir, alpaca_file, tmp_path):
    from sortedchat.training.trainer import Trainer

    if kind == "qlora":
        pytest.importorskip("bitsandbytes")
        if device == "cpu":
            pytest.skip("QLoRA in bfloat16 on a CPU is tests/test_train.py's (float32 there)")
    extra = {"soft": {}, "lora": dict(lora=True, lora_rank=4), "qlora": dict(lora=True, lora_rank=4, load_in_4bit=True)}
    out = tmp_path / kind
    opts = options(tiny_dir, alpaca_file, out, device=device, mixed_precision="bf16", max_steps=8, **extra[kind])
    trainer = Trainer(opts, Console(file=open(os.devnull, "w"))).setup()
    assert trainer.acc.device.type == device and trainer.acc.mixed_precision == "bf16"
    result = trainer.run()
    assert not result.interrupted and result.step == 8
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    first, last = logged[0]["exit_ce"], logged[-1]["exit_ce"]
    assert set(first) == set(last) == {"2", "4", "6"}
    for e in first:
        assert math.isfinite(last[e]) and last[e] < first[e], (e, first[e], last[e])
    assert json.loads((out / "sortedchat.json").read_text())["training"]["mixed_precision"] == "bf16"
    trained = load_sorted_model(str(out), LoadOptions(device=device))
    assert trained.device.type == device
    for depth in (2, 6):
        events = list(ChatSession(trained, Mode.fixed(depth)).generate(
            [{"role": "user", "content": "What is the capital of France?"}], SamplingConfig(max_new_tokens=8)))
        assert events and {ev.exit_layer for ev in events} == {depth}


# -- the app ------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@NO_CUDA
def test_the_app_answers_on_cuda_and_says_so(tiny_dir, tmp_path):
    from helpers.tui import ask, expected_answer, make_app, run_async, status

    on_gpu = load_sorted_model(str(tiny_dir), LoadOptions(device="cuda", exits=[2, 4, 6]))
    app = make_app(on_gpu, tmp_path)

    @run_async
    async def drive():
        async with app.run_test(size=(110, 34)) as pilot:
            await ask(pilot, app)
            text, events = expected_answer(on_gpu, [{"role": "user", "content": "Hello there"}])
            assert app.answer.text == text and text
            assert [e.token_id for e in app.events] == [e.token_id for e in events]
            shown = status(app).split(" · ")
            assert str(on_gpu.device) in shown and f"{len(events)} tokens" in shown and "Depth 6/6" in shown
