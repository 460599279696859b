"""`--quantize int8`: every mode and the lenses on the int8 model, its agreement with float32, the refusals, and
`eval`'s agreement with float32 full depth."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from sortedchat import SortedChatError
from sortedchat.cli import app
from sortedchat.engine import ChatSession, Mode, SamplingConfig
from sortedchat.quantize import PROJECTIONS, Int8Linear, check_request, describe, is_int8, quantize_model

from helpers.engine import PROMPTS, count_graph_calls, no_stop, prompt_ids, run

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def int8(tiny):
    """An int8 copy of the shared tiny model (the shared one stays float32)."""
    sm = copy.deepcopy(tiny)
    quantize_model(sm)
    return sm


def test_layer_products_and_head_are_int8_and_the_embedding_stays_float32(tiny, int8):
    attn, mlp = int8.layers[0].self_attn, int8.layers[0].mlp
    assert all(is_int8(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                                    mlp.up_proj, mlp.down_proj, int8.model.lm_head))
    embed = int8.model.model.embed_tokens.weight  # tied to the head in float32: the lookup is unchanged
    assert embed.dtype == torch.float32 and torch.equal(embed, tiny.model.model.embed_tokens.weight)
    assert type(tiny.model.lm_head) is nn.Linear  # the shared fixture was not touched
    assert describe(int8).endswith("-bit inputs): 42 of 42 layer products, the LM head; embeddings, norms float32")


def test_int8_products_are_float32_products_within_rounding_one_position_or_many():
    """One position goes through torch's dynamic kernel, several through `torch._int_mm` with a scale per
    position: both within 2% (relative) of float32, and a position's result does not depend on the others'."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    x = torch.randn(1, 5, 96)
    x[0, 0] *= 100  # one position far larger than the rest: its scale is its own
    with torch.inference_mode():
        q, ref = Int8Linear(linear), linear(x)
        many, one = q(x), q(x[:, 3:4])
    for got, want in ((many[0, 3], ref[0, 3]), (many[0, 0], ref[0, 0]), (one[0, 0], ref[0, 3])):
        assert (got - want).norm() / want.norm() < 0.02


def test_full_depth_agrees_with_float32_within_the_stated_tolerance(tiny, int8):
    """Teacher-forced over the fixture's corpus. The tiny model's random weights (init 0.2) make its logits near
    ties (median top-2 margin about 0.4) and its layers amplify errors, so its tolerance is loose: at least 80% of
    the top-1 tokens agree (measured 90%) and the logits lie within 15% relative error (measured 10%). The
    default model's agreement (target >= 98%) is measured by `sortedchat eval --quantize int8` (BENCHMARKS.md)."""
    from conftest import CORPUS

    ids = torch.tensor([tiny.tokenizer(" ".join(CORPUS[:5]))["input_ids"]])
    with torch.inference_mode():
        ref, got = tiny.model(ids).logits[0], int8.model(ids).logits[0]
    agreement = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    assert agreement >= 0.8
    assert (ref - got).norm() / ref.norm() <= 0.15
    assert agreement < 1  # int8 is not float32: the figure measures something


def test_the_engines_own_layer_step_runs_the_int8_products_as_transformers_layers_do(int8):
    """A prompt, a token at depth 2 leaving a backlog, propagated K/V (`kv_projection` on int8 projections) and a
    drain to full depth: the engine's own step gives what transformers' layer call gives on the same int8 model,
    bit for bit (a float difference of one ulp would move an int8 rounding, so only the same operators agree)."""
    from sortedchat.engine.layer_step import LayerStep, TransformersCall
    from sortedchat.engine.state import LayeredState, LayerSteps

    own, ref = LayeredState(int8), LayeredState(int8)
    ref.steps = LayerSteps(TransformersCall(layer, ref.cache) for layer in int8.layers)
    assert all(type(step) is LayerStep for step in own.steps)
    ids = prompt_ids(int8, PROMPTS[0])
    for depth, new in [(6, ids), (2, [7]), ("propagate", None), (2, [9]), (6, [11, 12])]:
        if depth == "propagate":
            assert own.propagate() == ref.propagate() > 0
            continue
        a, b = own.run(depth, new), ref.run(depth, new)
        assert torch.equal(a, b), (depth, new)
    for i in range(int8.num_layers):
        assert torch.equal(own.cache.layers[i].keys, ref.cache.layers[i].keys)
    own.check_invariants()


@pytest.mark.parametrize("mode", [Mode.fixed(2), Mode.auto(0.5), Mode.auto(0.5, kv="propagate"),
                                  Mode.fixed(4, kv="propagate"), Mode.speculative(2, draft_len=3, pace=False)],
                         ids=["depth", "auto", "auto-propagate", "depth-propagate", "speculative"])
def test_every_mode_runs_on_the_int8_model(int8, mode):
    session = no_stop(ChatSession(int8, mode))
    events = list(session.generate_ids(prompt_ids(int8, PROMPTS[1]), SamplingConfig(max_new_tokens=10)))
    tokens = [e for e in events if e.token_id is not None]
    assert len(tokens) == 10 and {e.exit_layer for e in tokens} <= set(int8.exits)
    if mode.kind.value == "depth":
        assert {e.exit_layer for e in tokens} == {mode.depth}
    if mode.kind.value == "speculative":
        assert session.last_stats.verifications > 0


def test_auto_mode_runs_with_every_confidence_measure_on_the_int8_model(int8):
    """The candidate-set measures read rows of the head's weight: the int8 head keeps the tied float32 ones."""
    from sortedchat.bench.costs import buildable_measures

    sm = copy.copy(int8)
    sm.config = copy.deepcopy(int8.config)
    measures = buildable_measures(sm)
    assert {"maxprob", "subset"} <= set(measures)
    assert int8.model.lm_head.weight is int8.model.model.embed_tokens.weight
    for name in measures:
        sm.config.confidence = name
        tokens = run(no_stop(ChatSession(sm, Mode.auto(0.5))), prompt_ids(sm, PROMPTS[0]), n=4)
        assert len(tokens) == 4, name


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_exit_lenses_and_the_layer_lens_run_on_the_quantized_model(tiny, kind):
    """Lenses stay float32 before the head (int8 or float32): a lens changes what its exit predicts, as on float32."""
    from sortedchat.sorted_model import ExitLenses

    sm = copy.deepcopy(tiny)
    sm.exit_lenses = ExitLenses([2], 64)
    quantize_model(sm, kind)
    assert type(sm.exit_lenses.lenses["2"]) is nn.Linear
    hidden = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plain = sm.head(hidden, 2)
        with torch.no_grad():
            sm.exit_lenses.lenses["2"].weight.mul_(-1)
        assert not torch.equal(sm.head(hidden, 2), plain)
    top = sm.exit_top_predictions(prompt_ids(sm, PROMPTS[0]), k=3)
    assert sorted(top) == sm.exits and all(len(v) == 3 for v in top.values())
    assert "lenses float32" in describe(sm)


def test_own_exit_heads_are_quantized_and_decode(tiny):
    from sortedchat.sorted_model import ExitHeads

    sm = copy.deepcopy(tiny)
    sm.exit_heads = ExitHeads([2], 64, sm.model.config.vocab_size, sm.model.model.norm)
    hidden = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = sm.head(hidden, 2)
        quantize_model(sm)
        after = sm.head(hidden, 2)
    assert is_int8(sm.exit_heads.heads["2"]) and "the exit heads" in describe(sm)
    assert (after - before).norm() / before.norm() < 0.05
    tokens = run(no_stop(ChatSession(sm, Mode.fixed(2))), prompt_ids(sm, PROMPTS[0]), n=4)
    assert len(tokens) == 4


def test_unmerged_adapter_layers_are_left_in_float32_and_go_through_transformers(tiny):
    from peft import LoraConfig, get_peft_model

    from sortedchat.engine.layer_step import TransformersCall
    from sortedchat.engine.state import LayeredState

    sm = copy.deepcopy(tiny)
    peft_model = get_peft_model(sm.model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    sm.model = peft_model.base_model.model
    quantize_model(sm)
    layer = sm.layers[0]
    assert hasattr(layer.self_attn.q_proj, "base_layer") and type(layer.self_attn.q_proj.base_layer) is nn.Linear
    assert is_int8(layer.self_attn.k_proj) and is_int8(layer.mlp.down_proj) and is_int8(sm.model.lm_head)
    assert "36 of 42 layer products, the LM head" in describe(sm)
    assert all(type(step) is TransformersCall for step in LayeredState(sm).steps)
    ids = torch.tensor([prompt_ids(sm, PROMPTS[0])])
    with torch.inference_mode():
        with_adapter = sm.model(ids).logits
        with peft_model.disable_adapter():
            without = sm.model(ids).logits
    assert not torch.allclose(with_adapter, without)  # the adapter still adds its product
    assert len(run(no_stop(ChatSession(sm, Mode.fixed())), ids[0].tolist(), n=6)) == 6


def test_a_model_it_cannot_quantize_is_refused_in_one_line_and_left_as_it_was(tiny):
    sm = copy.deepcopy(tiny)
    sm.layers[1].mlp.up_proj = nn.Identity()
    with pytest.raises(SortedChatError, match=r"^--quantize: layer 1's mlp.up_proj is a Identity, a layer type it "
                                              r"does not know \(it quantizes torch Linear layers\)$"):
        quantize_model(sm)
    assert describe(sm) == "none"  # nothing changed before the refusal
    half = copy.deepcopy(tiny)
    half.model.to(torch.bfloat16)
    with pytest.raises(SortedChatError, match="quantizes float32 weights: --dtype bfloat16"):
        quantize_model(half)
    with pytest.raises(SortedChatError, match=r"^--quantize int8 is for CPUs: the model would load on cuda "
                                              r"\(add --device cpu\)$"):
        check_request("int8", torch.device("cuda"), torch.float32, bitsandbytes=False)


@pytest.mark.parametrize("args, message", [
    (["--quantize", "int2"], "--quantize: 'int2' is not one of int8, int4"),
    (["--quantize", "int8", "--load-in-8bit"], "--quantize and --load-in-4bit/--load-in-8bit exclude each other"),
    (["--quantize", "int8", "--dtype", "bfloat16"], "--quantize int8 quantizes float32 weights: --dtype bfloat16 "
                                                    "asked for (use --dtype float32 or auto)"),
])
@pytest.mark.parametrize("command", ["ask", "eval"])
def test_bad_quantize_options_are_one_line_errors(tiny_dir, tmp_path, command, args, message):
    extra = ["Hi"] if command == "ask" else ["--data", str(tmp_path / "none.json"), "--json", str(tmp_path / "o.json")]
    res = runner.invoke(app, [command, *extra, "--model", str(tiny_dir), "--device", "cpu", *args])
    assert res.exit_code == 1 and str(res.exception) == message


def test_ask_and_info_on_the_int8_model(tiny_dir):
    res = runner.invoke(app, ["ask", "Hello!", "--model", str(tiny_dir), "--device", "cpu", "--quantize", "int8",
                              "-n", "4", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.splitlines()[-1])["event"] == "summary"
    res = runner.invoke(app, ["info", "--model", str(tiny_dir), "--device", "cpu", "--quantize", "int8"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.stdout.split())
    assert "quantized int8 (" in out and "42 of 42 layer products, the LM head" in out
    plain = runner.invoke(app, ["info", "--model", str(tiny_dir), "--device", "cpu"])
    assert "quantized none" in " ".join(plain.stdout.split())


def test_bench_names_the_int8_products_in_its_title_and_json(tiny_dir, tmp_path):
    prompts, out_json = tmp_path / "p.txt", tmp_path / "b.json"
    prompts.write_text("Hello!\n")
    res = runner.invoke(app, ["bench", "--model", str(tiny_dir), "--device", "cpu", "--quantize", "int8", "--prompts",
                              str(prompts), "-n", "2", "--repeat", "1", "--modes", "", "--threads", "1",
                              "--json", str(out_json)])
    assert res.exit_code == 0, res.output
    assert "float32, int8 products on cpu (1 thread)" in " ".join(res.stdout.split())
    data = json.loads(out_json.read_text())
    assert data["quantization"] == "int8" and data["quantized"].startswith("int8 (")


def test_a_propagated_kv_costs_the_same_share_of_an_int8_layer(tiny, int8):
    """`kv_fill_share` counts the int8 weights too (they are buffers, not parameters): "compute saved" with
    `--kv propagate` is not overstated on an int8 model."""
    from sortedchat.engine.state import LayeredState

    share = LayeredState(tiny).kv_fill_share
    assert 0 < share < 0.5 and LayeredState(int8).kv_fill_share == pytest.approx(share, rel=1e-3)


def test_eval_reports_each_exits_agreement_with_float32_full_depth(tiny, tiny_dir, tmp_path):
    from sortedchat.training.data import load_records
    from sortedchat.training.evaluate import full_depth_top1, score_exits
    from sortedchat.training.templates import encode_all

    records = [{"instruction": "What is the capital of France?", "input": "",
                "output": "Paris is the capital of France."},
               {"instruction": "Hello!", "input": "", "output": "How are you today? I am fine, thank you."}] * 3
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "eval.json"
    res = runner.invoke(app, ["eval", "--model", str(tiny_dir), "--data", str(data), "--device", "cpu",
                              "--quantize", "int8", "--json", str(out), "--max-length", "64"])
    assert res.exit_code == 0, res.output
    assert "=f32" in res.stdout and "(int8; =f32: top-1 as float32 full depth's)" in " ".join(res.stdout.split())
    [model] = json.loads(out.read_text())["models"]
    assert model["quantize"] == "int8"
    # The figures are those of the int8 copy scored against the float32 model's own full depth.
    encoded, _ = encode_all(load_records(str(data), False, "--data").examples, tiny.tokenizer, "chat", 64)
    sm = copy.deepcopy(tiny)
    sm.config.exits = sm.exits = model["exits"]
    reference = full_depth_top1(sm, encoded)
    quantize_model(sm)
    expected = score_exits(sm, encoded, sm.exits, reference=reference)
    assert {int(e): m["agree_f32"] for e, m in model["metrics"].items()} == pytest.approx(
        {e: m["agree_f32"] for e, m in expected.items()})
    assert 0.5 <= model["metrics"]["6"]["agree_f32"] < 1


@pytest.fixture(scope="module")
def int8_compiled(tiny):
    """The tiny model as `--quantize int8 --compile` loads it: grouped weights, and the compiled step (compiled once
    for the module; `int8` stays eager)."""
    from sortedchat.engine.compiled import compile_steps

    sm = copy.deepcopy(tiny)
    quantize_model(sm, grouped=True)
    assert compile_steps(sm) is None
    return sm


def test_only_compile_keeps_the_grouped_weights(int8, int8_compiled):
    """The compiled graph's grouped int8 weights are a second copy of the layers: an eager int8 model has none."""
    assert all(int8.layers[i].get_submodule(p).grouped is None for i in range(int8.num_layers) for p in PROJECTIONS)
    assert all(int8_compiled.layers[i].get_submodule(p).grouped is not None
               for i in range(int8_compiled.num_layers) for p in PROJECTIONS)


def test_the_compiled_steps_int8_product_is_the_float32_product_with_its_grouped_weights(int8_compiled):
    """The graph's product (`engine.compiled.linear`) on an int8 projection: float32 inputs times the int8 weights
    dequantized with one scale per 32 inputs, which hold the float32 weights to 1% (half a step of 127 per group)."""
    from sortedchat.engine.compiled import linear

    module = int8_compiled.layers[0].mlp.down_proj
    weight, scale = module.grouped
    dequantized = (weight.view(-1, 32).float() * scale.view(-1, 1)).view(weight.shape)
    x = torch.randn(1, 1, module.in_features, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(linear(x, weight, scale, None), torch.nn.functional.linear(x, dequantized), atol=1e-5)
    assert weight.dtype == torch.int8 and scale.shape == (module.out_features, module.in_features // 32)
    reference = torch.round(dequantized / scale.repeat_interleave(32, dim=1))
    assert torch.equal(reference, weight.float())


def test_compile_decodes_the_int8_model_through_the_graph_close_to_float32(tiny, int8_compiled, monkeypatch):
    """`--quantize int8 --compile`: every full-depth decoding step goes through the compiled graph, and teacher-forced
    on float32 full depth's greedy answers its next tokens agree with float32's on at least 70% (measured 78%; the
    eager int8 kernels 76%: the tiny model's random weights make near ties and amplify errors, and its 64 inputs are
    two groups of 32; on SmolLM2 the grouped weights pay, BENCHMARKS.md). Prompts go through the eager int8 step."""
    from sortedchat.engine.compiled import CompiledStep
    from sortedchat.engine.state import LayeredState

    calls = count_graph_calls(int8_compiled, monkeypatch)
    L, agree, total = tiny.num_layers, 0, 0
    with torch.inference_mode():
        for messages in PROMPTS:
            prompt = prompt_ids(tiny, messages)
            answer = run(no_stop(ChatSession(tiny, Mode.fixed())), prompt, n=16)
            states = [LayeredState(sm) for sm in (int8_compiled, tiny)]
            assert all(type(step) is CompiledStep for step in states[0].steps)
            for state in states:
                state.run(L, prompt)
            for token in answer[:-1]:
                got, ref = (state.run(L, [token]) for state in states)
                agree += int(int8_compiled.head(got, L)[0, -1].argmax() == tiny.head(ref, L)[0, -1].argmax())
                total += 1
    assert calls[0] == total * L  # every answer token's layers went through the graph
    assert agree >= 0.7 * total
