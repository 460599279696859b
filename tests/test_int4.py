"""`--quantize int4`: Q4_1 blocks kept exactly, a LoRA adapter kept beside them, every mode on the engine's own
step, the refusals, and the default model's agreement with float32."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sortedchat import SortedChatError
from sortedchat.engine import ChatSession, Mode, SamplingConfig
from sortedchat.loading import LoadOptions, load_sorted_model
from sortedchat.quantize import GROUP, Int4Linear, describe, kind, quantize_model, quantized_weights

from helpers.engine import PROMPTS, count_graph_calls, no_stop, prompt_ids, run

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def q4_1_linear(out_features: int, in_features: int, seed: int = 0) -> nn.Linear:
    """A Linear whose weights are what a GGUF's Q4_1 blocks convert to: q * d + m, float16 d and m per block."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_features, in_features // GROUP, GROUP), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # llama.cpp's blocks span their minimum (q = 0) to their maximum (q = 15)
    d = (torch.rand(out_features, in_features // GROUP, 1, generator=g) * 0.02 + 1e-3).half().float()
    m = (-8 * d - torch.rand(out_features, in_features // GROUP, 1, generator=g) * 0.01).half().float()
    linear = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_((q * d + m).reshape(out_features, in_features))
    return linear


@pytest.fixture(scope="module")
def int4(tiny):
    sm = copy.deepcopy(tiny)
    quantize_model(sm, "int4")
    return sm


def test_q4_1_blocks_are_found_exactly_and_multiplied_within_bfloat16_rounding():
    linear = q4_1_linear(96, 128)
    q = Int4Linear(linear)
    assert q.exact
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got, want = q(x), linear(x)
        assert got.shape == (3, 5, 96) and got.dtype == torch.float32
        assert (got - want).norm() / want.norm() < 0.01  # bfloat16 inputs and outputs: about 2^-8 each
        assert torch.allclose(q.weight, linear.weight, rtol=0, atol=float(linear.weight.abs().max()) * 2 ** -7)
    smooth = nn.Linear(128, 96, bias=False)  # weights that are not 4-bit blocks are rounded to them
    assert not Int4Linear(smooth).exact


def test_a_lora_adapter_is_kept_beside_the_blocks_and_adds_its_float32_product():
    linear = q4_1_linear(64, 96, seed=2)
    a, b = torch.randn(4, 96) * 0.1, torch.randn(64, 4) * 0.1
    x = torch.randn(2, 96, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        plain, adapted = Int4Linear(linear)(x), Int4Linear(linear, (a, b))(x)
    assert torch.allclose(adapted - plain, x @ a.t() @ b.t(), atol=1e-5)


def test_products_of_one_input_run_as_one_kernel_call_where_that_gives_each_ones_numbers():
    """q/k/v-like parts whose rows fill the kernel's packing groups are joined (one call, one copy of the weights);
    parts that do not (32 rows beside 64) are called in turn. Either way each output is its own call's, bit for bit."""
    from sortedchat.int4 import JoinedInt4, joined

    x = torch.randn(1, 3, 128, generator=torch.Generator().manual_seed(4))
    # every part adapted, or some; rows that fill the packing groups or not
    for sizes, adapted, together in (((128, 64, 64), (1, 1, 1), True), ((128, 64, 64), (0, 1, 1), True),
                                     ((64, 32, 32), (1, 1, 1), False)):
        parts = [Int4Linear(q4_1_linear(n, 128, seed=n), (torch.randn(4, 128), torch.randn(n, 4)) if a else None)
                 for n, a in zip(sizes, adapted)]
        with torch.inference_mode():
            alone = [p(x) for p in parts]
            call = joined(parts)
            assert isinstance(call, JoinedInt4) is together
            assert all(torch.equal(a, b) for a, b in zip(call(x), alone)), sizes
            assert all(torch.equal(p(x), a) for p, a in zip(parts, alone))  # the parts still give their own
        if together:
            assert parts[1].packed.data_ptr() == call.packed[128:].data_ptr()  # one copy of the weights
            assert joined(parts) is call  # joined once, however many decoding states ask


def test_prompts_run_on_bfloat16_copies_of_the_blocks_and_decoding_on_the_kernel(tiny, monkeypatch):
    """From `DENSE_ROWS` positions on a product multiplies a bfloat16 copy of the weights the kernel uses with the
    adapter merged into it (within bfloat16's rounding of them); fewer go through the kernel, the adapter beside it;
    joined parts give each part's own numbers either way (many positions: one product over the parts' copies side
    by side, where `joined` found it gives them). A model whose copies would pass `DENSE_LIMIT` keeps none."""
    import torch.nn.functional as F

    from sortedchat import int4 as int4_module
    from sortedchat.int4 import DENSE_ROWS, block_product, joined

    a, b = torch.randn(4, 128) * 0.1, torch.randn(128, 4) * 0.1
    parts = [Int4Linear(q4_1_linear(n, 128, seed=n), (a, b[:n]), dense=True) for n in (128, 64, 64)]
    q, g = parts[0], torch.Generator().manual_seed(5)
    few, many = torch.randn(DENSE_ROWS - 1, 128, generator=g), torch.randn(DENSE_ROWS, 128, generator=g)
    with torch.inference_mode():
        merged = q.weight + (q.lora[0] @ q.lora[1]).t()
        assert torch.allclose(q.dense.float(), merged, rtol=2 ** -8, atol=0)
        assert torch.equal(q(few), q.finish(block_product(few, q.packed, q.scales_and_zeros), few))
        assert torch.equal(q(many), F.linear(many.bfloat16(), q.dense).float())
        kernel = q.finish(block_product(many, q.packed, q.scales_and_zeros), many)
        assert (q(many) - kernel).norm() / kernel.norm() < 0.01
        call, prompt = joined(parts), torch.randn(50, 128, generator=g)
        for x in (few, many, prompt):
            assert all(torch.equal(out, p(x)) for out, p in zip(call(x), parts))
        if call.dense is not None:  # the parts' copies are views of the joined one: no more memory
            assert all(p.dense.untyped_storage().data_ptr() == call.dense.untyped_storage().data_ptr() for p in parts)
    assert Int4Linear(q4_1_linear(64, 128)).dense is None  # not asked for
    sm = copy.deepcopy(tiny)
    quantize_model(sm, "int4")
    assert sm.layers[0].mlp.down_proj.dense is not None
    monkeypatch.setattr(int4_module, "DENSE_LIMIT", 1000)
    sm = copy.deepcopy(tiny)
    quantize_model(sm, "int4")
    assert all(m.dense is None for m in sm.model.modules() if isinstance(m, Int4Linear))
    assert "bfloat16 copies" not in describe(sm)


def test_joined_copies_that_round_otherwise_leave_prompts_to_each_part(monkeypatch):
    """Where one product over the parts' copies side by side does not give each part's own numbers (a BLAS may split
    a wider product otherwise), `joined` keeps the kernel joined for decoding but leaves each part its own copy for
    prompts, and the parts' copies stay their own."""
    from sortedchat import int4 as int4_module
    from sortedchat.int4 import DENSE_ROWS, joined

    dense_product = int4_module.dense_product
    monkeypatch.setattr(int4_module, "dense_product",  # wider than any part: rounds otherwise
                        lambda flat, dense, bias: dense_product(flat, dense, bias) + (len(dense) > 128) * 1e-3)
    parts = [Int4Linear(q4_1_linear(n, 128, seed=n), dense=True) for n in (128, 64, 64)]
    call, g = joined(parts), torch.Generator().manual_seed(6)
    assert isinstance(call, int4_module.JoinedInt4) and call.dense is None
    assert len({p.dense.untyped_storage().data_ptr() for p in parts}) == 3
    with torch.inference_mode():
        for rows in (1, DENSE_ROWS, 50):
            x = torch.randn(rows, 128, generator=g)
            assert all(torch.equal(out, p(x)) for out, p in zip(call(x), parts))


def test_projections_are_int4_and_the_head_and_embedding_stay_float32(tiny, int4):
    layer = int4.layers[1]
    assert all(isinstance(layer.get_submodule(p), Int4Linear) for p in
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj"))
    assert type(int4.model.lm_head) is nn.Linear and int4.model.lm_head.weight.dtype == torch.float32
    assert kind(int4) == "int4" and kind(tiny) == "none"
    # the tiny model's random float32 weights are no 4-bit blocks: rounded, and said so
    assert describe(int4) == ("int4: 42 of 42 layer products in 4-bit blocks of 32 (bfloat16 inputs and scales; 0 of "
                              "them the loaded weights' own blocks, the rest rounded); prompts of 8 positions or more "
                              "on bfloat16 copies of them; LM head, embeddings, norms float32")
    assert quantized_weights(int4.model) == sum(p.numel() for layer in tiny.layers for n, p in
                                                layer.named_parameters() if "proj" in n)


def test_the_engines_own_step_runs_the_int4_products_as_transformers_layers_do(int4):
    from sortedchat.engine.layer_step import LayerStep, TransformersCall
    from sortedchat.engine.state import LayeredState, LayerSteps

    own, ref = LayeredState(int4), LayeredState(int4)
    ref.steps = LayerSteps(TransformersCall(layer, ref.cache) for layer in int4.layers)
    assert all(type(step) is LayerStep for step in own.steps)
    # the tiny model's gate/up (128 rows each) run joined, its q/k/v (64, 32, 32 rows) in turn
    assert type(own.steps[0].gate_up).__name__ == "JoinedInt4" and type(own.steps[0].qkv).__name__ == "function"
    ids = prompt_ids(int4, PROMPTS[0])
    for depth, new in [(6, ids), (2, [7]), (6, [11, 12])]:
        assert torch.equal(own.run(depth, new), ref.run(depth, new)), (depth, new)
    own.check_invariants()


@pytest.mark.parametrize("mode", [Mode.fixed(2), Mode.auto(0.5), Mode.auto(0.5, kv="propagate"),
                                  Mode.speculative(2, draft_len=3, pace=False)],
                         ids=["depth", "auto", "auto-propagate", "speculative"])
def test_every_mode_runs_on_the_int4_model(int4, mode):
    session = no_stop(ChatSession(int4, mode))
    tokens = [e for e in session.generate_ids(prompt_ids(int4, PROMPTS[1]), SamplingConfig(max_new_tokens=10))
              if e.token_id is not None]
    assert len(tokens) == 10 and {e.exit_layer for e in tokens} <= set(int4.exits)


@pytest.mark.parametrize("threads", [1, 2])
def test_an_adapted_int4_model_keeps_the_engines_own_step_at_any_thread_count(tiny, threads):
    """Adapters on every projection: the joined products must give each part's own numbers for one position too
    (an adapter's products joined across parts did not, on 2 threads), or every layer would fall back to
    transformers' call. The joined weights stay ordinary tensors though made while decoding (inference mode)."""
    from peft import LoraConfig, get_peft_model

    from sortedchat.engine.layer_step import LayerStep
    from sortedchat.engine.state import LayeredState

    sm = copy.deepcopy(tiny)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    sm.model = get_peft_model(sm.model, LoraConfig(r=8, target_modules=targets, init_lora_weights=False)
                              ).base_model.model
    quantize_model(sm, "int4")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            state = LayeredState(sm)
        assert all(type(step) is LayerStep for step in state.steps)
        assert type(state.steps[0].gate_up).__name__ == "JoinedInt4"
        assert not sm.layers[0].mlp.gate_proj.packed.is_inference()
        sm.model.load_state_dict(sm.model.state_dict())  # a joined model's buffers can still be loaded into
        assert len(run(no_stop(ChatSession(sm, Mode.fixed())), prompt_ids(sm, PROMPTS[0]), n=4)) == 4
    finally:
        torch.set_num_threads(before)


def test_an_unmerged_peft_adapter_becomes_the_int4_products_own_lora(tiny):
    from peft import LoraConfig, get_peft_model

    sm = copy.deepcopy(tiny)
    peft_model = get_peft_model(sm.model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"],
                                                     init_lora_weights=False))
    sm.model = peft_model.base_model.model
    ids = torch.tensor([prompt_ids(sm, PROMPTS[0])])
    with torch.inference_mode():
        with peft_model.disable_adapter():
            base_logits = sm.model(ids).logits
        float_logits = sm.model(ids).logits
    quantize_model(sm, "int4")
    q = sm.layers[0].self_attn.q_proj
    assert isinstance(q, Int4Linear) and q.lora is not None and sm.layers[0].self_attn.k_proj.lora is None
    assert "a LoRA adapter kept beside 12 of them in float32" in describe(sm)
    with torch.inference_mode():
        got = sm.model(ids).logits
    # closer to the adapted float32 model than the adapter's own contribution: the adapter still adds its product
    assert (got - float_logits).norm() < (base_logits - float_logits).norm()
    assert len(run(no_stop(ChatSession(sm, Mode.fixed())), ids[0].tolist(), n=6)) == 6


def test_a_layer_whose_inputs_do_not_fill_4_bit_blocks_is_refused_and_the_model_left_as_it_was(tiny):
    sm = copy.deepcopy(tiny)
    sm.layers[1].mlp.down_proj = nn.Linear(100, 64, bias=False)
    with pytest.raises(SortedChatError, match=r"^--quantize int4: layer 1's mlp.down_proj has 100 inputs, not a "
                                              r"multiple of the 32 a 4-bit block holds$"):
        quantize_model(sm, "int4")
    assert describe(sm) == "none"
    sm.layers[1].mlp.down_proj = nn.Linear(128, 40, bias=False)
    with pytest.raises(SortedChatError, match=r"^--quantize int4: layer 1's mlp.down_proj has 40 outputs, not a "
                                              r"multiple of the 16 torch's int4 kernel packs together$"):
        quantize_model(sm, "int4")


@pytest.mark.slow
@pytest.mark.usefixtures("default_model_here")
def test_the_default_model_keeps_its_gguf_blocks_and_agrees_with_float32():
    """The default's layers come from a Q4_1 GGUF: all 210 products are its blocks exactly, the shipped adapter
    beside them. Teacher-forced (one sequence: the products' bfloat16 copies), full depth agrees with the float32
    model (base + adapter, as `eval --quantize int4` takes its reference) on at least 97% of the README's first 1024
    tokens
    (measured 98.4% on its first 512; 99.4% on 1024 tokens of Wikipedia; 99.2% of 11269 held-out response tokens,
    the issue's measure, in BENCHMARKS.md): a stated tolerance below the measures, for other CPUs' kernels."""
    from pathlib import Path

    sm = load_sorted_model(None, LoadOptions(device="cpu", unmerged=True))
    ids = torch.tensor([sm.tokenizer((Path(__file__).parents[1] / "README.md").read_text())["input_ids"][:1024]])
    with torch.inference_mode():
        reference = sm.model(ids).logits.argmax(-1)
        quantize_model(sm, "int4")
        agreement = (sm.model(ids).logits.argmax(-1) == reference).float().mean().item()
    assert describe(sm).startswith("int4: 210 of 210 layer products in 4-bit blocks of 32 (bfloat16 inputs and "
                                   "scales; 210 of them the loaded weights' own blocks); prompts of 8 positions or "
                                   "more on bfloat16 copies of them; a LoRA adapter kept beside")
    assert agreement >= 0.97, agreement


def test_ask_info_and_eval_on_the_int4_model(tiny_dir, tmp_path):
    """The CLI end to end: `ask` answers, `info` says what is 4-bit, `eval` scores each exit's agreement with
    float32 full depth (the =f32 column)."""
    import json

    from typer.testing import CliRunner

    from sortedchat.cli import app

    runner = CliRunner()
    flags = ["--model", str(tiny_dir), "--device", "cpu", "--quantize", "int4"]
    res = runner.invoke(app, ["ask", "Hello!", *flags, "-n", "4", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.splitlines()[-1])["event"] == "summary"
    res = runner.invoke(app, ["info", *flags])
    assert res.exit_code == 0, res.output
    assert "quantized int4: 42 of 42 layer products in 4-bit blocks of 32" in " ".join(res.stdout.split())
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": f"Say {w}.", "input": "", "output": f"{w} {w} {w}."}
                                for w in ("hello", "yes", "blue", "seven")]))
    res = runner.invoke(app, ["eval", "--data", str(data), "--json", str(tmp_path / "o.json"), *flags])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "o.json").read_text())["models"][0]
    assert result["quantize"] == "int4"
    assert all(0 <= m["agree_f32"] <= 1 for m in result["metrics"].values())
    # the tiny model's random weights are no 4-bit blocks and rounding them moves its near-tied logits (measured
    # 33% of about 20 tokens): the default model's figure is the slow test above
    assert 0 < result["metrics"][str(result["layers"])]["agree_f32"] < 1


def test_an_adapter_directory_loads_unmerged_for_int4_and_eval_quantizes_those_weights(tiny_dir, tmp_path, monkeypatch):
    """`--quantize int4` on an adapter keeps it beside the base's blocks (merging would move the weights off
    them); `eval --quantize int4` takes its float32 reference from the same unmerged model before quantizing it."""
    import json

    from test_loading import _tiny_adapter
    from typer.testing import CliRunner

    from sortedchat.cli import app
    from sortedchat.training import evaluate

    adapter = tmp_path / "adapter"
    _tiny_adapter(tiny_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(tiny_dir)}))
    sm = load_sorted_model(str(adapter), LoadOptions(device="cpu", quantize="int4"))
    attn = sm.layers[0].self_attn
    assert attn.q_proj.lora is not None and attn.v_proj.lora is not None and attn.k_proj.lora is None

    quantized_with_adapter_beside = []
    original = evaluate.quantize_model

    def recording(model, kind):
        quantized_with_adapter_beside.append(any(hasattr(m, "base_layer") for m in model.model.modules()))
        original(model, kind)

    monkeypatch.setattr(evaluate, "quantize_model", recording)
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "hi hi hi."}]))
    res = CliRunner().invoke(app, ["eval", "--model", str(adapter), "--device", "cpu", "--quantize", "int4",
                                   "--data", str(data), "--json", str(tmp_path / "o.json")])
    assert res.exit_code == 0, res.output
    assert quantized_with_adapter_beside == [True]


@pytest.mark.parametrize("adapted", [None, "float32", "float16", "some"],
                         ids=["plain", "adapter on every projection", "adapter of float16 values",
                              "adapter on q, gate and up, of other ranks"])
@pytest.mark.usefixtures("shared_libraries")
def test_compile_runs_the_int4_products_in_the_graph_and_answers_what_eager_does(tiny, adapted, monkeypatch):
    """`--quantize int4 --compile`: the graph runs the same packed blocks (joined as the eager step joins them) and
    the adapter beside them, read in float16 where that holds all its values exactly (as the shipped adapter's), in
    float32 otherwise; in every layer; greedy answers in every mode are eager int4's. With an adapter on some of a
    joined group's products (q of q/k/v), each adapted one reads its own; gate and up, adapted at ranks 8 and 4,
    read their A sides side by side."""
    from peft import LoraConfig, get_peft_model

    from sortedchat.engine.compiled import CompiledStep, adapter_copies, adapter_dtype, compile_steps

    eager = copy.deepcopy(tiny)
    if adapted:
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        config = LoraConfig(r=8, target_modules=targets, init_lora_weights=False)
        if adapted == "some":
            config = LoraConfig(r=8, target_modules=["q_proj", "gate_proj", "up_proj"], rank_pattern={"up_proj": 4},
                                init_lora_weights=False)
        eager.model = get_peft_model(eager.model, config).base_model.model
    quantize_model(eager, "int4")
    if adapted == "float16":  # (the prompts' copies keep the adapter they merged: the same on both sides)
        for m in eager.model.modules():
            if isinstance(m, Int4Linear) and m.lora is not None:
                m.lora = tuple(t.half().float() for t in m.lora)
    sm = copy.deepcopy(eager)
    assert compile_steps(sm) is None
    calls = count_graph_calls(sm, monkeypatch)
    steps = ChatSession(sm).state.steps
    step = steps[0]
    assert all(type(s) is CompiledStep for s in steps)  # every layer's inputs are the library's
    assert step.plan[2][0]  # gate/up in one kernel call, as eagerly
    assert step.plan[2][1] == bool(adapted)  # and their adapters' first products as one
    again = ChatSession(sm).state.steps[0].tensors
    assert len(again) == len(step.tensors) and all(a is b for a, b in zip(step.tensors, again))  # once, not per session
    adapted_parts = [lora for group in step.plan for _, _, lora, _ in group[2]]
    assert adapted_parts == ([True, False, False, False, True, True, False] if adapted == "some"
                             else [bool(adapted)] * 7)
    if adapted:  # gate/up's adapters as the graph reads them: their A side by side, each one's B
        dtype = torch.float16 if adapted == "float16" else torch.float32
        assert adapter_dtype(sm) == dtype
        gate, up = sm.layers[0].mlp.gate_proj, sm.layers[0].mlp.up_proj
        a, (b_gate, b_up) = adapter_copies([gate, up], dtype)
        assert a.shape == (8 + (4 if adapted == "some" else 8), gate.in_features)
        assert torch.equal(a.float(), torch.cat([gate.lora[0].t(), up.lora[0].t()]))
        assert torch.equal(b_gate.float(), gate.lora[1]) and torch.equal(b_up.float(), up.lora[1])
        assert {t.dtype for t in (a, b_gate, b_up)} == {dtype}
        assert all(any(c is t for t in step.tensors) for c in (a, b_gate, b_up))
    for mode in (Mode.fixed(), Mode.auto(0.3), Mode.speculative(2, draft_len=3, pace=False)):
        answers = [run(no_stop(ChatSession(m, mode)), prompt_ids(m, PROMPTS[0]), n=12) for m in (eager, sm)]
        assert answers[1] == answers[0]
    assert calls[0] > 12 * sm.num_layers
