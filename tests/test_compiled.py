"""`--compile`: the compiled one-position step answers exactly what the eager engine answers in every mode, keeps the
layered K/V invariants, compiles once for a whole chat, and falls back to eager with one warning line."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from typer.testing import CliRunner

from sortedchat.cli import app
from sortedchat.engine import ChatSession, Mode, SamplingConfig
from sortedchat.engine import compiled as compiled_module
from sortedchat.engine.compiled import CompiledStep, compile_problem, compile_steps

from helpers.engine import PROMPTS, count_graph_calls, no_stop, prompt_ids

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MODES = {
    "full depth": Mode.fixed(),
    "fixed depth 4": Mode.fixed(4),
    "auto": Mode.auto(0.3),
    "speculative": Mode.speculative(2, draft_len=3, pace=False),
    "fixed depth 2, propagate": Mode.fixed(2, kv="propagate"),
    "auto, propagate": Mode.auto(0.3, kv="propagate"),
}


@pytest.fixture(scope="module")
def compiled(tiny):
    """A copy of the shared tiny model with the compiled step (compiled once for the module; `tiny` stays eager)."""
    sm = copy.deepcopy(tiny)
    assert compile_steps(sm) is None
    return sm


@pytest.fixture
def graph_calls(compiled, monkeypatch):
    """How many layer steps went through the compiled graph (a list of one count)."""
    return count_graph_calls(compiled, monkeypatch)


def greedy(sm, mode, messages, n=24, check=False):
    """The greedy answer of a fresh session in `mode`, checking the state's invariants after every token if asked."""
    session = no_stop(ChatSession(sm, mode))
    tokens = []
    for event in session.generate_ids(prompt_ids(sm, messages), SamplingConfig(max_new_tokens=n)):
        tokens.append(event.token_id)
        if check:
            session.state.check_invariants()
    session.state.check_invariants()
    return tokens, session


@pytest.mark.parametrize("name", MODES)
def test_compiled_and_eager_give_the_same_greedy_tokens_in_every_mode(tiny, compiled, graph_calls, name):
    for messages in PROMPTS:
        expected, _ = greedy(tiny, MODES[name], messages)
        got, session = greedy(compiled, MODES[name], messages, check=True)
        assert got == expected, messages
        assert all(type(step) is CompiledStep for step in session.state.steps)
    assert graph_calls[0] > 0  # the compiled graph ran, not only the eager fallback


def test_a_mid_answer_mode_switch_gives_the_same_tokens_and_k_v(tiny, compiled, graph_calls):
    """Depths 2, 6, 4, auto, speculative and 1 in turn within one answer: backlogs drain eagerly, single positions run
    compiled, and the tokens, lengths and K/V match the eager engine's."""
    plan = [Mode.fixed(2), Mode.fixed(6), Mode.fixed(4), Mode.auto(0.3), Mode.speculative(2, 3), Mode.fixed(1)]
    answers, states = [], []
    for sm in (tiny, compiled):
        session = no_stop(ChatSession(sm, Mode.fixed(2)))
        tokens = []
        for i, event in enumerate(session.generate_ids(prompt_ids(sm, PROMPTS[2]), SamplingConfig(max_new_tokens=30))):
            tokens.append(event.token_id)
            session.mode = plan[(i // 5) % len(plan)]
            session.state.check_invariants()
        answers.append(tokens)
        states.append(session.state)
    eager, fused = states
    assert answers[0] == answers[1] and eager.kv_len == fused.kv_len and eager.kv_len[0] > eager.kv_len[-1]
    # float32 sums in another order: each layer's K/V within 1e-5 of its norm (on a Xeon with AVX-512 the sixth
    # layer's were 8.6e-7 apart, single elements up to 1.4e-5: roundings adding up layer by layer)
    for mine, reference in zip(fused.cache.layers, eager.cache.layers):
        for a, b in ((mine.keys, reference.keys), (mine.values, reference.values)):
            assert a.shape == b.shape and (a - b).norm() <= 1e-5 * b.norm()
    assert graph_calls[0] > 0


def test_multi_turn_reuse_gives_the_same_answers(tiny, compiled, graph_calls):
    questions = ["Hello! How are you today?", "What is the capital of France?", "And of Italy?"]
    assert converse(tiny, questions) == converse(compiled, questions)
    assert graph_calls[0] > 0


def converse(sm, questions):
    """Each answer's tokens, one question after another in one session (which reuses the chat's K/V)."""
    session, convo, answers = no_stop(ChatSession(sm)), [], []
    for question in questions:
        convo.append({"role": "user", "content": question})
        events = list(session.generate(convo, SamplingConfig(max_new_tokens=10)))
        convo.append({"role": "assistant", "content": "".join(e.text for e in events)})
        answers.append([e.token_id for e in events])
        session.state.check_invariants()
        assert len(answers) == 1 or session.last_stats.reused_tokens > 10
    return answers


def test_a_long_chat_never_recompiles_and_writes_k_v_into_the_layers_buffers(tiny, compiled, graph_calls):
    """150 tokens take each layer's buffer from 64 positions to 130 and 262 (it grows eagerly, then the same library
    goes on at every K/V length and capacity)."""
    graph = compiled_module._GRAPHS[compiled.model]
    libraries = dict(graph.loaders)
    expected, _ = greedy(tiny, Mode.fixed(), PROMPTS[0], n=150)
    got, session = greedy(compiled, Mode.fixed(), PROMPTS[0], n=150)
    assert got == expected
    assert graph.loaders == libraries  # nothing compiled or loaded again
    layer = session.state.cache.layers[-1]
    buffer = layer._buffers[0]  # GrowingLayer's: the compiled graph wrote into it, in place
    assert layer.keys.data_ptr() == buffer.data_ptr() and buffer.shape[1] == 262
    assert graph_calls[0] > 140 * compiled.num_layers


def test_the_library_is_kept_in_the_cache_folder_loaded_by_the_next_start_and_compiled_again_if_damaged(
        tiny, tmp_path, monkeypatch):
    """A second model of the same shapes (the next start) loads the library the first one compiled, without
    compiling, and answers the same; a damaged library (a full disk, a copy cut short) is built again, once (that
    build is the first one's library written again: the test is about the cache folder, not a second compile)."""
    packages = tmp_path / "cache" / "packages"
    packages.mkdir(parents=True)
    (packages / "decode-00000000-0123.pt2").write_bytes(b"compiled by an older sortedchat")
    first = copy.deepcopy(tiny)
    assert compile_steps(first) is None
    libraries = list(packages.glob("*"))  # the older library pruned, no temporary left behind
    assert len(libraries) == 1 and libraries[0].name.startswith("decode-") and libraries[0].suffix == ".pt2"

    compiled_library, compiling = libraries[0].read_bytes(), []

    def rebuilt(program, package_path):
        compiling.append(1)
        compiled_module.Path(package_path).write_bytes(compiled_library)

    monkeypatch.setattr(compiled_module.torch._inductor, "aoti_compile_and_package", rebuilt)
    second = copy.deepcopy(tiny)
    assert compile_steps(second) is None and not compiling
    expected = greedy(tiny, Mode.fixed(), PROMPTS[0], n=12)[0]
    assert greedy(second, Mode.fixed(), PROMPTS[0], n=12)[0] == expected

    size = libraries[0].stat().st_size
    libraries[0].write_bytes(libraries[0].read_bytes()[: size // 2])
    third = copy.deepcopy(tiny)
    assert compile_steps(third) is None and compiling == [1]
    assert libraries[0].read_bytes() == compiled_library and list(packages.glob("*")) == libraries
    assert greedy(third, Mode.fixed(), PROMPTS[0], n=12)[0] == expected


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_model_with_biases_and_as_many_k_v_heads_as_heads_compiles(tmp_path, monkeypatch, dtype):
    """Other LLaMA shapes than the tiny model's: biases on every projection, no grouped K/V heads, head size 24.
    float32 answers what eager does; bfloat16 (half precision rounds otherwise in fused kernels) is accepted too."""
    from conftest import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from sortedchat.loading import LoadOptions, load_sorted_model

    tok = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=72, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=3, num_key_value_heads=3, attention_bias=True, mlp_bias=True,
                         initializer_range=0.2, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m", safe_serialization=True)
    tok.save_pretrained(tmp_path / "m")
    eager = load_sorted_model(str(tmp_path / "m"), LoadOptions(device="cpu", dtype=dtype))
    sm = copy.deepcopy(eager)
    assert compile_steps(sm) is None
    calls = count_graph_calls(sm, monkeypatch)
    got, _ = greedy(sm, Mode.fixed(), PROMPTS[0], n=12)
    assert len(got) == 12 and calls[0] >= 11 * sm.num_layers
    if dtype == "float32":
        assert got == greedy(eager, Mode.fixed(), PROMPTS[0], n=12)[0]


def test_another_thread_count_gets_a_library_of_its_own(tiny, compiled, graph_calls):
    """The libraries' kernels are compiled for one thread count: at another, the step compiles (or loads) one for it,
    and answers the same."""
    graph = compiled_module._GRAPHS[compiled.model]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected, _ = greedy(tiny, Mode.fixed(), PROMPTS[1], n=12)
        got, _ = greedy(compiled, Mode.fixed(), PROMPTS[1], n=12)
    finally:
        torch.set_num_threads(before)
    assert got == expected and set(graph.loaders) == {1, 2} and graph.problem is None
    assert graph_calls[0] >= 11 * compiled.num_layers


def test_where_compiling_fails_one_warning_line_and_eager(tiny, monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setattr(compiled_module.torch._inductor, "aoti_compile_and_package", no_compiler)
    sm = copy.deepcopy(tiny)
    problem = ("--compile: the compiled step failed, decoding eagerly (InvalidCxxCompiler: No working C++ compiler "
               "found)")
    assert compile_steps(sm) == problem and compile_problem(sm) == problem
    assert not list(compiled_module.Path(os.environ["SORTEDCHAT_CACHE_DIR"]).rglob("*.pt2"))
    expected, _ = greedy(tiny, Mode.fixed(4), PROMPTS[0], n=8)
    got, session = greedy(sm, Mode.fixed(4), PROMPTS[0], n=8)
    assert got == expected and not any(type(step) is CompiledStep for step in session.state.steps)


def test_ask_with_compile_warns_once_and_answers_where_compiling_fails(tiny_dir, monkeypatch):
    def fails(*args, **kwargs):
        raise OSError("cannot write the library")

    monkeypatch.setattr(compiled_module.torch._inductor, "aoti_compile_and_package", fails)
    args = ["ask", "Hello!", "--model", str(tiny_dir), "--device", "cpu", "-n", "4", "--compile"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.stderr.splitlines() if "--compile" in line]
    assert warnings == ["warning: --compile: the compiled step failed, decoding eagerly (cannot write the library)"]
    assert res.stdout.strip()


def test_a_model_the_compiled_step_does_not_know_stays_eager(tiny):
    sm = copy.deepcopy(tiny)
    sm.layers[0].mlp.act_fn = torch.nn.GELU()
    assert compile_steps(sm) == ("--compile: this model's layers are not the kind the compiled step knows; "
                                 "decoding eagerly")
    assert not any(type(step) is CompiledStep for step in ChatSession(sm).state.steps)


REFUSED = "--compile: the compiled step does not compute what the eager one does; decoding eagerly"


@pytest.mark.parametrize("weights", ["float32", "int4", "bfloat16"])
@pytest.mark.usefixtures("compiled", "shared_libraries")  # float32: the module's library, not compiled again
def test_a_graph_that_computes_something_else_is_refused_by_the_probe(tiny, tiny_dir, monkeypatch, weights):
    """The probe's tolerance lets fused roundings through (int4's inputs are rounded to bfloat16, and half
    precision rounds its residual stream at its own scale, so they get wider ones), not a layer off by a tenth of
    its output."""
    from sortedchat.loading import LoadOptions, load_sorted_model
    from sortedchat.quantize import quantize_model

    run = compiled_module.DecodeGraph.run
    monkeypatch.setattr(compiled_module.DecodeGraph, "run", lambda self, inputs: run(self, inputs) * 1.1)
    if weights == "bfloat16":
        sm = load_sorted_model(str(tiny_dir), LoadOptions(device="cpu", dtype="bfloat16", exits=[2, 4, 6]))
    else:
        sm = copy.deepcopy(tiny)
    if weights == "int4":
        quantize_model(sm, weights)
    assert compile_steps(sm) == REFUSED and compile_problem(sm) == REFUSED
    assert not any(type(step) is CompiledStep for step in ChatSession(sm).state.steps)


@pytest.mark.usefixtures("shared_libraries")
def test_a_half_precision_graph_whose_update_is_off_is_refused_by_the_probe(tiny_dir, monkeypatch):
    """In half precision the probe does not count what two ulps of the output can make, but a layer whose update
    is a tenth off, its residual kept, is still refused."""
    from sortedchat.loading import LoadOptions, load_sorted_model

    sm = load_sorted_model(str(tiny_dir), LoadOptions(device="cpu", dtype="bfloat16", exits=[2, 4, 6]))
    assert compile_steps(copy.deepcopy(sm)) is None  # as it is, its roundings pass
    run = compiled_module.DecodeGraph.run
    monkeypatch.setattr(compiled_module.DecodeGraph, "run",
                        lambda self, inputs: inputs[0] + 1.1 * (run(self, inputs) - inputs[0]))
    assert compile_steps(sm) == REFUSED


@pytest.mark.usefixtures("compiled", "shared_libraries")
def test_a_graph_that_writes_another_key_is_refused_by_the_probe(tiny, monkeypatch):
    """The probe compares what each step writes into the K/V as well as its output: a step whose output is right
    but whose key for the new position is a tenth off (every later token would read it) is refused."""
    run = compiled_module.DecodeGraph.run

    def another_key(self, inputs):
        out = run(self, inputs)
        inputs[3][-1] *= 1.1  # the keys' last position, which the graph has just written
        return out

    monkeypatch.setattr(compiled_module.DecodeGraph, "run", another_key)
    assert compile_steps(copy.deepcopy(tiny)) == REFUSED


@pytest.mark.usefixtures("compiled", "shared_libraries")
def test_a_graph_that_gives_nan_is_refused_by_the_probe(tiny, monkeypatch):
    run = compiled_module.DecodeGraph.run
    monkeypatch.setattr(compiled_module.DecodeGraph, "run", lambda self, inputs: run(self, inputs) * float("nan"))
    assert compile_steps(copy.deepcopy(tiny)) == REFUSED
