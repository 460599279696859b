"""`sortedchat train` on the tiny random model: the losses, the data, resuming, several processes, the output."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sortedchat import SortedChatError
from sortedchat.cli import app

from helpers.data import alpaca_records
from helpers.training import options, run

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py











def objective_for(tiny_dir, **kw):
    from sortedchat.loading import LoadOptions, load_sorted_model
    from sortedchat.training.objectives import SortedObjective

    sm = load_sorted_model(str(tiny_dir), LoadOptions(device="cpu", exits=[2, 4, 6]))
    return sm, SortedObjective(sm.model, sm.num_layers, **kw)


def encoded_batch(sm, records=None):
    from sortedchat.training.data import Example
    from sortedchat.training.templates import collate, encode

    records = records or alpaca_records(3)
    examples = [Example([{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}],
                        "test", input=r["input"]) for r in records]
    encoded = [encode(ex, sm.tokenizer, "chat", 128) for ex in examples]
    return encoded, collate(encoded, sm.tokenizer.pad_token_id)


def truncated(model, depth):
    """An independent reference: the same HF model cut to its first `depth` layers (its logits are exit `depth`)."""
    short = copy.deepcopy(model)
    short.model.layers = short.model.layers[:depth]
    short.config.num_hidden_layers = depth
    return short


# -- the losses ------------------------------------------------------------------------------------------
def test_soft_loss_is_the_mean_of_the_exit_losses_computed_by_hand(tiny_dir):
    sm, objective = objective_for(tiny_dir)
    encoded, batch = encoded_batch(sm)
    n = sum(e.targets for e in encoded)
    total, ce_sums, _ = objective(**batch, exits=[2, 4, 6], coefs=torch.full((3,), 1 / 3 / n))
    by_hand = [truncated(sm.model, e)(**batch).loss.item() for e in (2, 4, 6)]  # HF's own shifted CE
    assert (ce_sums / n).tolist() == pytest.approx(by_hand, rel=1e-5)
    assert total.item() == pytest.approx(sum(by_hand) / 3, rel=1e-5)


def test_sft_loss_and_gradient_are_the_last_exits_only(tiny_dir):
    sm, objective = objective_for(tiny_dir)
    encoded, batch = encoded_batch(sm)
    n = sum(e.targets for e in encoded)
    total, ce_sums, _ = objective(**batch, exits=[6], coefs=torch.tensor([1.0 / n]))
    total.backward()
    ours = {k: p.grad.clone() for k, p in sm.model.named_parameters()}
    sm.model.zero_grad()
    reference = sm.model(**batch).loss
    reference.backward()
    assert total.item() == pytest.approx(reference.item(), rel=1e-5) and ce_sums.shape == (1,)
    for k, p in sm.model.named_parameters():
        assert torch.allclose(ours[k], p.grad, atol=1e-6), k


def test_fused_head_gradient_matches_autograd_through_the_module(tiny_dir):
    from sortedchat.training.objectives import head_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hiddens = [torch.randn(9, 16, requires_grad=True) for _ in range(2)]
    targets = torch.randint(0, 50, (9,))
    teacher = (torch.randn(9, 16), torch.randn(50, 16))
    grads = []
    for impl in ("fused", "module"):
        head.zero_grad()
        for h in hiddens:
            h.grad = None
        total, ce, kl = head_loss(head, hiddens, targets, torch.tensor([0.3, 0.7]), 0.5, teacher, impl)
        (2 * total).backward()
        grads.append((total.item(), ce, kl, head.weight.grad.clone(), [h.grad.clone() for h in hiddens]))
    (t1, ce1, kl1, w1, h1), (t2, ce2, kl2, w2, h2) = grads
    assert t1 == pytest.approx(t2, rel=1e-5) and torch.allclose(ce1, ce2) and torch.allclose(kl1, kl2)
    assert torch.allclose(w1, w2, atol=1e-6) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(h1, h2))


def test_kd_distils_toward_the_frozen_start(tiny_dir):
    sm, objective = objective_for(tiny_dir, objective="kd", teacher=None)
    objective._teacher = [copy.deepcopy(sm.model)]
    encoded, batch = encoded_batch(sm)
    _, _, kl = objective(**batch, exits=[2, 4, 6], coefs=torch.ones(3))
    assert kl[-1].item() == pytest.approx(0.0, abs=1e-3)  # the start's last exit is the teacher itself
    assert (kl[:2] > 1.0).all()


def test_kd_with_lora_distils_toward_the_base_with_the_adapter_switched_off(tiny_dir):
    """With --lora the teacher is no copy: it is the same model with the adapter disabled, i.e. the start."""
    from peft import LoraConfig, get_peft_model

    from sortedchat.training.objectives import SortedObjective
    from sortedchat.training.templates import IGNORE

    sm, _ = objective_for(tiny_dir)
    start = copy.deepcopy(sm.model)
    peft_model = get_peft_model(sm.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    objective = SortedObjective(peft_model, sm.num_layers, "kd")
    encoded, batch = encoded_batch(sm)
    select = batch["labels"][:, 1:] != IGNORE
    hidden, weight = objective._teacher_hidden(batch["input_ids"], batch["attention_mask"], select)
    with torch.no_grad():
        expected = start.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        adapted = peft_model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
    torch.testing.assert_close(hidden, expected.last_hidden_state[:, :-1][select], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(hidden, adapted.hidden_states[-1][:, :-1][select], atol=1e-3)
    assert torch.equal(weight, start.lm_head.weight)
    _, _, kl = objective(**batch, exits=[2, 4, 6], coefs=torch.ones(3))
    assert (kl > 0).all()  # the adapted model is no longer the start, at any exit


# -- data and labels -------------------------------------------------------------------------------------
def test_labels_cover_the_response_and_its_end_of_turn_token(tiny_dir):
    from sortedchat.loading import LoadOptions, load_sorted_model
    from sortedchat.training.templates import IGNORE

    sm = load_sorted_model(str(tiny_dir), LoadOptions(device="cpu"))
    tok = sm.tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # the trap: masking pad would mask end-of-turn
    encoded, batch = encoded_batch(sm, [{"instruction": "Hello!", "input": "", "output": "I am fine."}])
    labelled = [t for t in encoded[0].labels if t != IGNORE]
    assert tok.decode(labelled) == "I am fine.<|im_end|>"
    first = next(i for i, lab in enumerate(encoded[0].labels) if lab != IGNORE)
    assert tok.decode(encoded[0].input_ids[:first]) == "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(encoded[0].input_ids[first + len(labelled):]) == "\n"  # the template's glue after the turn


def test_alpaca_template_labels_response_and_eos(tiny_dir):
    from sortedchat.loading import LoadOptions, load_sorted_model
    from sortedchat.training.data import Example
    from sortedchat.training.templates import IGNORE, encode

    tok = load_sorted_model(str(tiny_dir), LoadOptions(device="cpu")).tokenizer
    ex = Example([{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hello!"}], "t", input="now")
    enc = encode(ex, tok, "alpaca", 256)
    text = tok.decode(enc.input_ids)
    assert "### Instruction:\nSay hi\n\n### Input:\nnow\n\n### Response:\nHello!<|im_end|>" in text
    assert tok.decode([t for t in enc.labels if t != IGNORE]) == "Hello!<|im_end|>"


@pytest.mark.parametrize("content, where, message", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', "line 2", "not a record"),
    ('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": 7}\n', "line 3",
     "'output' must be a string"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', "line 2", "invalid JSON"),
    ('[\n {"instruction": "a", "output": "b"},\n {"question": "q", "answer": "x"}\n]', "line 3",
     "a qa record in a file of alpaca"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "line 1", "no assistant message"),
])
def test_malformed_records_name_file_and_line(tmp_path, content, where, message):
    from sortedchat.training.data import load_records

    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(SortedChatError) as err:
        load_records(str(path))
    assert str(err.value).startswith(f"{path}: {where}: ") and message in str(err.value)


def test_malformed_data_stops_the_command_before_training(tiny_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in alpaca_records(4)) + '\n{"instruction": "x", "output": ""}\n')
    res = subprocess.run([sys.executable, "-m", "sortedchat", "train", "--model", str(tiny_dir), "--data", str(data),
                          "--out", str(tmp_path / "out"), "--device", "cpu"], capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == f"error: {data}: line 5: 'output' is empty"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_tables_read_through_datasets_name_the_bad_row(tmp_path, suffix):
    import datasets

    from sortedchat.training.data import load_records

    rows = alpaca_records(4)
    rows[2]["output"] = ""
    path = tmp_path / f"data{suffix}"
    table = datasets.Dataset.from_list(rows)
    table.to_csv(str(path), index=False) if suffix == ".csv" else table.to_parquet(str(path))
    with pytest.raises(SortedChatError, match=f"^{path}: row 3: 'output' is (empty|missing)$"):
        load_records(str(path))
    good = load_records(str(path), skip_bad=True)
    assert good.kind == "alpaca" and len(good.examples) == 3 and good.skipped == 1
    assert good.examples[0].messages[1]["content"] == rows[0]["output"]


def test_skip_bad_skips_and_counts(tiny_dir, tmp_path):
    data = tmp_path / "some-bad.jsonl"
    lines = [json.dumps(r) for r in alpaca_records(8)]
    lines[2], lines[5] = '{"instruction": 1, "output": "x"}', "not json"
    data.write_text("\n".join(lines) + "\n")
    run(options(tiny_dir, data, tmp_path / "out", skip_bad=True, max_steps=1))
    cfg = json.loads((tmp_path / "out" / "sortedchat.json").read_text())
    assert cfg["training"]["data"]["records"] == 6 and cfg["training"]["data"]["skipped"] == 2


def test_data_order_is_a_function_of_seed_and_step():
    from sortedchat.training.templates import step_indices

    first_epoch = [i for s in range(4) for i in step_indices(16, 4, seed=3, step=s)]
    assert sorted(first_epoch) == list(range(16))
    assert step_indices(16, 4, 3, 5) == step_indices(16, 4, 3, 5) != step_indices(16, 4, 4, 5)


# -- runs --------------------------------------------------------------------------------------------------
def test_training_lowers_every_exit_and_the_output_loads_and_generates(tiny_dir, alpaca_file, tmp_path):
    from sortedchat.engine import ChatSession, Mode, SamplingConfig
    from sortedchat.loading import LoadOptions, load_sorted_model
    from sortedchat.training.data import load_records
    from sortedchat.training.evaluate import score_exits
    from sortedchat.training.templates import encode_all

    out = tmp_path / "soft"
    result = run(options(tiny_dir, alpaca_file, out, max_steps=8, holdout=4))
    assert not result.interrupted and result.step == 8
    start = load_sorted_model(str(tiny_dir), LoadOptions(device="cpu", exits=[2, 4, 6]))
    trained = load_sorted_model(str(out), LoadOptions(device="cpu"))
    assert trained.exits == [2, 4, 6]
    enc, _ = encode_all(load_records(str(alpaca_file)).examples, start.tokenizer, "chat", 64)
    before, after = score_exits(start, enc, [2, 4, 6]), score_exits(trained, enc, [2, 4, 6])
    for e in (2, 4, 6):
        assert after[e]["ce"] < before[e]["ce"] - 1.0, (e, before[e], after[e])

    cfg = json.loads((out / "sortedchat.json").read_text())
    t = cfg["training"]
    assert t["method"] == "soft" and t["steps"] == 8 and t["seed"] == 0 and t["exits_trained"] == [2, 4, 6]
    assert t["data"]["sha256"] == hashlib.sha256(alpaca_file.read_bytes()).hexdigest()
    assert t["data"]["records"] == 12 and t["data"]["holdout"] == 4
    assert set(t["metrics"]["eval"]) == {"2", "4", "6"} and set(t["metrics"]["train"]) == {"2", "4", "6"}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, 9)) and "eval" in lines[-1]

    for depth in (2, 6):
        session = ChatSession(trained, Mode.fixed(depth))
        events = list(session.generate([{"role": "user", "content": "What is the capital of France?"}],
                                       SamplingConfig(max_new_tokens=12)))
        assert events and {ev.exit_layer for ev in events} == {depth}
        assert "".join(ev.text for ev in events).strip()


def test_sft_run_trains_only_the_last_exit(tiny_dir, alpaca_file, tmp_path):
    run(options(tiny_dir, alpaca_file, tmp_path / "sft", method="sft", max_steps=2))
    lines = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert all(set(x["exit_ce"]) == {"6"} and x["loss"] == pytest.approx(x["exit_ce"]["6"]) for x in lines)
    assert json.loads((tmp_path / "sft" / "sortedchat.json").read_text())["training"]["exits_trained"] == [6]


def _interrupt_at(step):
    def callback(current):
        if current == step:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl+C, delivered mid-run
    return callback


@pytest.mark.parametrize("extra", [
    dict(exits_per_step=2, grad_accum=2, save_interval=2),
    dict(lora=True, lora_rank=4, lora_dropout=0.2, max_grad_norm=0.5),
], ids=["full-sampled-exits", "lora-dropout"])
def test_interrupted_and_resumed_equals_uninterrupted(tiny_dir, alpaca_file, tmp_path, extra):
    straight = run(options(tiny_dir, alpaca_file, tmp_path / "a", max_steps=6, **extra))
    stopped = run(options(tiny_dir, alpaca_file, tmp_path / "b", max_steps=6, **extra), _interrupt_at(3))
    assert stopped.interrupted and stopped.step == 3 and stopped.checkpoint.name == "step-00000003"
    assert not (tmp_path / "b" / "sortedchat.json").exists()
    resumed = run(options(tiny_dir, alpaca_file, tmp_path / "b", max_steps=6, resume=True, **extra))
    assert not resumed.interrupted and resumed.step == straight.step == 6
    name = "adapter_model.safetensors" if extra.get("lora") else "model.safetensors"
    a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in lines if '"loss"' in x]
    assert steps == list(range(1, 7))


def test_ctrl_c_on_the_command_line_saves_a_checkpoint_and_says_how_to_resume(tiny_dir, alpaca_file, tmp_path):
    import time

    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "sortedchat", "train", "--model", str(tiny_dir), "--data", str(alpaca_file), "--out",
           str(out), "--exits", "2,4,6", "--max-steps", "100000", "--batch-size", "2", "--log-interval", "1",
           "--device", "cpu", "--max-length", "64"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = int(err.split("interrupted at step ")[1].split("/")[0])
    assert f"checkpoint saved in {out / 'checkpoints' / f'step-{step:08d}'}" in err and "--resume" in err
    assert (out / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").is_file()


def test_resume_refuses_a_different_run(tiny_dir, alpaca_file, tmp_path):
    run(options(tiny_dir, alpaca_file, tmp_path / "r", max_steps=4), _interrupt_at(2))
    with pytest.raises(SortedChatError,
                       match=r"--resume: .*step-00000002 was trained with lr=0.01, this run has lr=0.02"):
        run(options(tiny_dir, alpaca_file, tmp_path / "r", max_steps=4, lr=2e-2, resume=True))
    with pytest.raises(SortedChatError, match="already holds files"):
        run(options(tiny_dir, alpaca_file, tmp_path / "r", max_steps=4))


def test_checkpoint_publish_is_atomic(tiny_dir, alpaca_file, tmp_path):
    out = tmp_path / "c"
    run(options(tiny_dir, alpaca_file, out, max_steps=4, save_interval=1, keep_checkpoints=2))
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-00000003", "step-00000004"]  # no temporary directory left, older ones pruned
    # A crash mid-save leaves a hidden temporary directory; the newest complete checkpoint is still used.
    (out / "checkpoints" / ".tmp-step-00000005").mkdir()
    from sortedchat.training.checkpoints import checkpoint_dirs

    assert checkpoint_dirs(out)[-1][0] == 4


def _disk_full_at(steps, real):
    """accelerate's save_state that fills the disk at the given steps: a first file is written, then ENOSPC."""
    import errno
    from pathlib import Path

    def save_state(acc, output_dir, **kw):
        step = int(Path(output_dir).name.rsplit("-", 1)[1])
        if step in steps:
            (Path(output_dir) / "model.safetensors").write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(acc, output_dir, **kw)

    return save_state


def test_a_periodic_checkpoint_on_a_full_disk_is_a_warning_and_the_run_goes_on(tiny_dir, alpaca_file, tmp_path,
                                                                                  monkeypatch):
    import io

    from accelerate import Accelerator
    from rich.console import Console

    from sortedchat.training.trainer import train

    monkeypatch.setattr(Accelerator, "save_state", _disk_full_at({2}, Accelerator.save_state))
    out, said = tmp_path / "full", io.StringIO()
    result = train(options(tiny_dir, alpaca_file, out, max_steps=4, save_interval=1, keep_checkpoints=5),
                   Console(file=said, width=400))
    assert not result.interrupted and result.step == 4 and (out / "sortedchat.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001", "step-00000003",
                                                                        "step-00000004"]  # no .tmp-step left
    assert (f"warning: could not write the checkpoint of step 2 into {out / 'checkpoints'} (No space left on device); "
            f"the newest checkpoint is still {out / 'checkpoints' / 'step-00000001'}; training goes on"
            ) in said.getvalue()


def test_a_full_disk_at_the_end_writes_the_model_first_and_says_what_was_saved(tiny_dir, alpaca_file, tmp_path,
                                                                                 monkeypatch):
    from accelerate import Accelerator

    out, ckpts = tmp_path / "end", tmp_path / "end" / "checkpoints"
    monkeypatch.setattr(Accelerator, "save_state", _disk_full_at({2}, Accelerator.save_state))
    with pytest.raises(SortedChatError) as err:
        run(options(tiny_dir, alpaca_file, out, max_steps=2, save_interval=1))
    assert str(err.value) == (f"the model is saved in {out}, but could not write the checkpoint of step 2 into {ckpts} "
                              f"(No space left on device); the newest checkpoint is still {ckpts / 'step-00000001'}")
    assert load_sorted_model_exits(out) == [2, 4, 6]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000001"]


def test_a_model_that_does_not_fit_leaves_the_final_checkpoint_to_resume_from(tiny_dir, alpaca_file, tmp_path,
                                                                              monkeypatch):
    import errno

    from sortedchat.training import export

    def disk_full(tmp, model, state):
        (tmp / "model.safetensors").write_bytes(b"the start of the weights")
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "end"
    real = export._save_weights
    monkeypatch.setattr(export, "_save_weights", disk_full)
    with pytest.raises(SortedChatError) as err:
        run(options(tiny_dir, alpaca_file, out, max_steps=2))
    final = out / "checkpoints" / "step-00000002"
    assert str(err.value) == (f"could not write the model into {out} (No space left on device); the final checkpoint "
                              f"is saved in {final}: free some space and run the same command with --resume to "
                              "write the model")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl"]  # no half-written export
    monkeypatch.setattr(export, "_save_weights", real)
    resumed = run(options(tiny_dir, alpaca_file, out, max_steps=2, resume=True))
    assert resumed.step == 2 and load_sorted_model_exits(out) == [2, 4, 6]


def load_sorted_model_exits(directory) -> list[int]:
    from sortedchat.loading import LoadOptions, load_sorted_model

    return load_sorted_model(str(directory), LoadOptions(device="cpu")).exits


def test_two_processes_give_the_losses_of_one(tiny_dir, alpaca_file, tmp_path):
    one = tmp_path / "one"
    run(options(tiny_dir, alpaca_file, one, batch_size=4))
    two = tmp_path / "two"
    accelerate = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "-m", "sortedchat", "train", "--model", str(tiny_dir), "--data",
           str(alpaca_file), "--out", str(two), "--exits", "2,4,6", "--max-steps", "4", "--batch-size", "2",
           "--lr", "0.01", "--warmup-steps", "0", "--log-interval", "1", "--device", "cpu", "--max-length", "64"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "x 2" in res.stderr  # really two processes
    a = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    b = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
        assert x["exit_ce"] == pytest.approx(y["exit_ce"], rel=1e-4)


def test_lora_adapter_output_loads_on_its_base_and_merge_writes_full_weights(tiny_dir, alpaca_file, tmp_path):
    from sortedchat.engine import ChatSession, Mode, SamplingConfig
    from sortedchat.loading import LoadOptions, load_sorted_model

    adapter = tmp_path / "adapter"
    run(options(tiny_dir, alpaca_file, adapter, lora=True, lora_rank=4, max_steps=3, lora_modules_to_save="model.norm"))
    cfg = json.loads((adapter / "sortedchat.json").read_text())
    assert not (adapter / "model.safetensors").exists()
    stored = load_file(str(adapter / "adapter_model.safetensors"))
    assert [k for k in stored if "lora_" not in k] == ["base_model.model.model.norm.weight"]  # the shared norm
    assert cfg["base_model"] == str(tiny_dir.resolve()) and cfg["training"]["lora"]["rank"] == 4
    merged = tmp_path / "merged"
    run(options(tiny_dir, alpaca_file, merged, lora=True, lora_rank=4, max_steps=3, merge=True,
                lora_modules_to_save="model.norm"))
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    assert json.loads((merged / "sortedchat.json").read_text())["base_model"] is None
    # The adapter applied to its base and the merged weights are the same model.
    a = load_sorted_model(str(adapter), LoadOptions(device="cpu"))
    m = load_sorted_model(str(merged), LoadOptions(device="cpu"))
    prompt = [{"role": "user", "content": "Hello!"}]
    texts = ["".join(ev.text for ev in ChatSession(sm, Mode.fixed(4)).generate(prompt,
                                                                                  SamplingConfig(max_new_tokens=8)))
             for sm in (a, m)]
    assert texts[0] == texts[1] and texts[0]


def test_qlora_trains_an_adapter_on_a_4bit_base(tiny_dir, alpaca_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    from sortedchat.loading import LoadOptions, load_sorted_model

    out = tmp_path / "qlora"
    result = run(options(tiny_dir, alpaca_file, out, lora=True, lora_rank=4, load_in_4bit=True, max_steps=2))
    assert result.step == 2 and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "sortedchat.json").read_text())["training"]["lora"]["quantized"] == "4bit"
    sm = load_sorted_model(str(out), LoadOptions(device="cpu"))
    assert sm.exits == [2, 4, 6]


def test_ict_trains_exit_heads_that_the_engine_uses(tiny_dir, alpaca_file, tmp_path):
    from sortedchat.loading import LoadOptions, load_sorted_model
    from sortedchat.training.data import load_records
    from sortedchat.training.evaluate import score_exits
    from sortedchat.training.templates import encode_all

    out = tmp_path / "ict"
    run(options(tiny_dir, alpaca_file, out, method="ict", max_steps=6))
    cfg = json.loads((out / "sortedchat.json").read_text())
    assert cfg["exit_heads"] == "exit_heads.safetensors" and cfg["training"]["exits_trained"] == [2, 4]
    assert sorted(load_file(str(out / "exit_heads.safetensors"))) == [
        "heads.2.weight", "heads.4.weight", "norms.2.weight", "norms.4.weight"]
    start = load_sorted_model(str(tiny_dir), LoadOptions(device="cpu", exits=[2, 4, 6]))
    ict = load_sorted_model(str(out), LoadOptions(device="cpu"))
    assert ict.exit_heads is not None and ict.exit_heads.has(2) and ict.exit_heads.has(4)
    for k, v in start.model.state_dict().items():  # the model itself is frozen
        assert torch.equal(v, ict.model.state_dict()[k]), k
    enc, _ = encode_all(load_records(str(alpaca_file)).examples, start.tokenizer, "chat", 64)
    before, after = score_exits(start, enc, [2, 4, 6]), score_exits(ict, enc, [2, 4, 6])
    assert after[2]["ce"] < before[2]["ce"] - 0.5 and after[4]["ce"] < before[4]["ce"] - 0.5
    assert after[6]["ce"] == pytest.approx(before[6]["ce"], rel=1e-5)


# -- recipes and the command line ------------------------------------------------------------------------
def test_recipe_values_apply_and_command_line_flags_win(tiny_dir, alpaca_file, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'model = "{tiny_dir}"\ndata = "{alpaca_file}"\nexits = [2, 4, 6]\nmax_steps = 2\n'
                      'batch_size = 2\nlr = 0.005\nmethod = "sft"\nmax_length = 64\n')
    res = runner.invoke(app, ["train", "--recipe", str(recipe), "--out", str(tmp_path / "o"), "--method", "soft",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    t = json.loads((tmp_path / "o" / "sortedchat.json").read_text())["training"]
    assert t["method"] == "soft" and t["lr"] == 0.005 and t["steps"] == 2 and t["recipe"] == str(recipe)


def test_recipe_typos_are_named(tmp_path):
    from sortedchat.training.recipe import load_recipe

    bad = tmp_path / "bad.toml"
    bad.write_text('lr = 0.001\nlearning_rate = 0.1\n')
    with pytest.raises(SortedChatError, match=f"--recipe {bad}: unknown option 'learning_rate'"):
        load_recipe(bad)
    bad.write_text('max_steps = "ten"\n')
    with pytest.raises(SortedChatError, match="'max_steps' must be a whole number"):
        load_recipe(bad)


@pytest.mark.parametrize("args, message", [
    (["--method", "fancy"], "--method: 'fancy' is not one of soft, sft, ict"),
    (["--merge"], "--merge merges a LoRA adapter: add --lora"),
    (["--exits", "2,9"], "--exits: exit 9 is outside 1..6"),
    (["--exits", "2,4,6", "--exit-weights", "1,2"], "--exit-weights: 2 weights for 3 trained exits (2,4,6)"),
    (["--batch-size", "64"], "--batch-size: one step takes 64 records"),
])
def test_bad_options_are_one_line_errors(tiny_dir, alpaca_file, tmp_path, args, message):
    res = runner.invoke(app, ["train", "--model", str(tiny_dir), "--data", str(alpaca_file), "--out",
                              str(tmp_path / "o"), "--device", "cpu", *args])
    assert res.exit_code != 0 and isinstance(res.exception, SortedChatError), res.output
    assert str(res.exception).startswith(message)


def test_every_train_option_is_a_flag_of_train():
    """The flags of `train` are derived from `TrainOptions` (`--recipe`, a path, is declared by the command)."""
    import dataclasses

    from sortedchat.training.recipe import TrainOptions

    res = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "300"})
    for f in dataclasses.fields(TrainOptions):
        assert f"--{f.name.replace('_', '-')} " in res.stdout, f.name
    assert "--no-lora " in res.stdout and "--no-trust-remote-code" not in res.stdout


def test_shipped_recipes_parse():
    from pathlib import Path

    from sortedchat.training.recipe import METHODS, coerce_option, load_recipe

    recipes = sorted((Path(__file__).parent.parent / "training" / "recipes").glob("*.toml"))
    assert {p.name for p in recipes} >= {"paper-llama2-13b-alpaca.toml", "paper-llama2-13b-triviaqa.toml",
                                         "smollm2-135m-alpaca.toml", "smollm2-135m-default.toml",
                                         "smollm2-135m-soft-lens.toml"}
    for p in recipes:
        values = load_recipe(p)
        assert values["method"] in METHODS
        for key, value in values.items():
            assert coerce_option(key, value, str(p)) == value


def test_sft_baseline_on_a_soft_recipe_drops_its_per_exit_settings(tmp_path):
    """`--recipe R --method sft` is the paper's baseline on the same recipe: the recipe's exit weights and
    exit sampling are SoFT settings and are dropped; given explicitly with sft they are still an error."""
    from sortedchat.training.recipe import resolve_options

    recipe = tmp_path / "r.toml"
    recipe.write_text('data = "d.json"\nexit_weights = [1, 1, 3]\nexits_per_step = 2\nlr = 5e-4\n')
    soft = resolve_options({"out": "o"}, str(recipe))
    assert soft.exit_weights == [1.0, 1.0, 3.0] and soft.exits_per_step == 2
    sft = resolve_options({"out": "o", "method": "sft"}, str(recipe))
    assert sft.exit_weights is None and sft.exits_per_step == 0 and sft.lr == 5e-4
    with pytest.raises(SortedChatError, match="--method sft trains the last exit only"):
        resolve_options({"out": "o", "method": "sft", "exit_weights": [1.0, 2.0]}, str(recipe))


# -- lenses, cached teacher top-K and packing -------------------------------------------------------------
def _kd_terms(sm, hiddens, targets, teacher_hidden, top_k, negatives=64, alpha=0.5):
    """(exact KL and CE sums, candidate-set KL and CE sums) of the shared head over the same states."""
    from sortedchat.training.objectives import candidate_loss, head_loss

    head = sm.model.lm_head
    coefs = torch.ones(len(hiddens))
    _, ce_exact, kl_exact = head_loss(head, hiddens, targets, coefs, alpha, (teacher_hidden, head.weight))
    logp = torch.log_softmax(head(teacher_hidden).float(), -1)
    top = logp.topk(top_k, -1)
    neg = torch.randperm(head.weight.shape[0], generator=torch.Generator().manual_seed(0))[:negatives]
    _, ce_cand, kl_cand = candidate_loss(head.weight, hiddens, targets, coefs, alpha, top.indices, top.values, neg)
    return (kl_exact, ce_exact), (kl_cand, ce_cand)


def test_candidate_set_losses_equal_the_exact_ones_at_full_vocabulary_and_approach_them_as_k_grows(tiny_dir):
    from sortedchat.training.templates import IGNORE

    sm, _ = objective_for(tiny_dir)
    encoded, batch = encoded_batch(sm)
    with torch.no_grad():
        out = sm.model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             output_hidden_states=True)
    select = batch["labels"][:, 1:] != IGNORE
    targets = batch["labels"][:, 1:][select]
    hiddens = [sm.model.model.norm(out.hidden_states[e][:, :-1][select]) for e in (2, 4)]
    teacher = out.last_hidden_state[:, :-1][select]
    V = sm.model.lm_head.weight.shape[0]
    (kl, ce), (kl_c, ce_c) = _kd_terms(sm, hiddens, targets, teacher, V)
    torch.testing.assert_close(kl_c, kl, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ce_c, ce, rtol=1e-4, atol=1e-4)
    errors = []
    for k in (4, 32, 128, V - 8):
        (kl, _), (kl_c, _) = _kd_terms(sm, hiddens, targets, teacher, k, negatives=V // 2)
        errors.append(((kl_c - kl).abs() / kl).max().item())
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.02, errors


def test_candidate_set_gradient_matches_a_finite_difference(tiny_dir):
    from sortedchat.training.objectives import candidate_loss

    torch.manual_seed(0)
    weight = torch.randn(50, 8)
    h = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    top_logp, top_ids = torch.log_softmax(torch.randn(5, 50), -1).topk(6, -1)
    args = (torch.randint(50, (5,)), torch.ones(1), 0.5, top_ids, top_logp.double(), torch.arange(10, 40))
    w = weight.double()

    def f(x):
        return candidate_loss(w, [x], args[0], *args[1:3], *args[3:])[0]

    assert torch.autograd.gradcheck(f, (h,), eps=1e-6, atol=1e-5)


def test_teacher_top_k_is_the_models_own_and_is_cached_by_model_data_and_k(tiny_dir, tmp_path, monkeypatch):
    from sortedchat.training import teacher_cache
    from sortedchat.training.templates import IGNORE

    monkeypatch.setenv("SORTEDCHAT_CACHE_DIR", str(tmp_path / "cache"))
    sm, _ = objective_for(tiny_dir)
    encoded, batch = encoded_batch(sm)
    identity = teacher_cache.model_identity(tiny_dir)
    top = teacher_cache.teacher_top_k(sm.model, identity, encoded, 8, torch.device("cpu"), say=lambda m: None)
    with torch.no_grad():
        logits = sm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    select = batch["labels"][:, 1:] != IGNORE
    expected = torch.log_softmax(logits[:, :-1][select], -1).topk(8, -1)
    ids, logp = top.gather(list(range(len(encoded))))
    assert torch.equal(ids, expected.indices)
    torch.testing.assert_close(logp, expected.values, atol=1e-5, rtol=1e-5)
    files = list((tmp_path / "cache" / "teacher-top-k").iterdir())
    assert len(files) == 1
    said = []
    again = teacher_cache.teacher_top_k(sm.model, identity, encoded, 8, torch.device("cpu"), say=said.append)
    assert "read from" in said[0] and torch.equal(again.gather([0, 1, 2])[0], ids)
    teacher_cache.teacher_top_k(sm.model, identity, encoded, 4, torch.device("cpu"), say=lambda m: None)
    teacher_cache.teacher_top_k(sm.model, identity, encoded[:2], 8, torch.device("cpu"), say=lambda m: None)
    assert len(list((tmp_path / "cache" / "teacher-top-k").iterdir())) == 3


def test_packed_rows_give_the_losses_of_padded_ones(tiny_dir):
    from sortedchat.training.templates import collate_rows, packed_micro_batches

    sm, objective = objective_for(tiny_dir)
    encoded, _ = encoded_batch(sm, alpaca_records(6))
    rows = packed_micro_batches(encoded, list(range(6)), 8, 2 * max(len(e.input_ids) for e in encoded))[0]
    assert len(rows) < 6 and sorted(i for r in rows for i in r) == list(range(6))
    order = [i for r in rows for i in r]
    padded = collate_rows(encoded, [[i] for i in order], sm.tokenizer.pad_token_id)
    packed = collate_rows(encoded, rows, sm.tokenizer.pad_token_id)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == len(rows)
    coefs = torch.ones(3)
    _, ce_padded, _ = objective(**padded, exits=[2, 4, 6], coefs=coefs)
    _, ce_packed, _ = objective(**packed, exits=[2, 4, 6], coefs=coefs)
    torch.testing.assert_close(ce_packed, ce_padded, rtol=1e-4, atol=1e-4)


def test_lens_training_leaves_the_model_and_full_depth_untouched_and_the_engine_applies_the_lenses(
        tiny_dir, alpaca_file, tmp_path, monkeypatch):
    from sortedchat.engine import ChatSession, Mode, SamplingConfig
    from sortedchat.loading import LoadOptions, load_sorted_model
    from sortedchat.training.data import load_records
    from sortedchat.training.evaluate import score_exits
    from sortedchat.training.templates import encode_all

    monkeypatch.setenv("SORTEDCHAT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "lens"
    run(options(tiny_dir, alpaca_file, out, method="lens", objective="kd", kd_top_k=16, kd_negatives=32,
                pack=True, max_steps=10, lr=3e-2, holdout=4, eval_interval=5))
    cfg = json.loads((out / "sortedchat.json").read_text())
    assert cfg["exit_lenses"] == "exit_lenses.safetensors" and cfg["base_model"] == str(tiny_dir.resolve())
    assert not (out / "model.safetensors").exists()  # only what was trained is written
    assert sorted(load_file(str(out / "exit_lenses.safetensors"))) == [
        "lenses.2.bias", "lenses.2.weight", "lenses.4.bias", "lenses.4.weight"]
    evals = [json.loads(x)["eval"] for x in (out / "metrics.jsonl").read_text().splitlines() if "eval" in x]
    assert len(evals) == 2 and evals[-1]["6"]["agree"] == 1.0 and 0 <= evals[-1]["2"]["agree"] <= 1

    from typer.testing import CliRunner

    from sortedchat.cli import app

    info = CliRunner().invoke(app, ["info", "--model", str(out), "--device", "cpu"])
    assert info.exit_code == 0 and "per-exit lenses at 2, 4, then the shared norm" in " ".join(info.stdout.split())
    start = load_sorted_model(str(tiny_dir), LoadOptions(device="cpu", exits=[2, 4, 6]))
    lensed = load_sorted_model(str(out), LoadOptions(device="cpu"))
    assert lensed.exit_lenses is not None and lensed.exit_lenses.exits == [2, 4]
    for k, v in start.model.state_dict().items():
        assert torch.equal(v, lensed.model.state_dict()[k]), k
    enc, _ = encode_all(load_records(str(alpaca_file)).examples, start.tokenizer, "chat", 64)
    before, after = score_exits(start, enc, [2, 4, 6]), score_exits(lensed, enc, [2, 4, 6])
    assert after[2]["agree"] + after[4]["agree"] > before[2]["agree"] + before[4]["agree"] + 0.1
    assert after[6]["ce"] == pytest.approx(before[6]["ce"], rel=1e-6)

    h = torch.randn(1, 64)
    lens = lensed.exit_lenses.lenses["2"]
    expected = start.model.lm_head(start.model.model.norm(h @ lens.weight.T + lens.bias))
    torch.testing.assert_close(lensed.head(h, 2), expected)
    prompt = lensed.tokenizer("What is the capital of France?")["input_ids"]
    session = ChatSession(lensed, Mode.fixed(2))
    steps = [ev.token_id for ev in session.generate_ids(prompt, SamplingConfig(max_new_tokens=6))]
    # reference: the first 2 layers, the lens, the shared norm and head, greedily, without the engine
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(len(steps)):
            hs = start.model.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[2]
            ids.append(int(lensed.head(hs[:, -1], 2).argmax()))
    assert steps and steps == ids[len(prompt):]


def test_soft_with_lenses_can_start_from_a_trained_models_lenses(tiny_dir, alpaca_file, tmp_path, monkeypatch):
    """--init-lenses: SoFT + lenses on top of a lens-only model starts from its lenses, not the identity."""
    monkeypatch.setenv("SORTEDCHAT_CACHE_DIR", str(tmp_path / "cache"))
    lens_run = tmp_path / "lens"
    run(options(tiny_dir, alpaca_file, lens_run, method="lens", objective="kd", kd_top_k=16, kd_negatives=32,
                max_steps=4, lr=3e-2))
    trained = load_file(str(lens_run / "exit_lenses.safetensors"))
    assert not torch.equal(trained["lenses.2.weight"], torch.eye(64))
    # every weight's step is lr-sized (AdamW): at 1e-7 the lenses stay where they started, within float32 noise
    out = tmp_path / "soft"
    run(options(tiny_dir, alpaca_file, out, method="soft", objective="kd", kd_top_k=16, lenses=True, lora=True,
                lora_rank=4, max_steps=1, lr=1e-7, init_lenses=str(lens_run)))
    continued = load_file(str(out / "exit_lenses.safetensors"))
    assert sorted(continued) == sorted(trained)
    for k in trained:
        torch.testing.assert_close(continued[k], trained[k], atol=1e-6, rtol=0)
    assert json.loads((out / "sortedchat.json").read_text())["training"]["options"]["init_lenses"] == str(lens_run)

    with pytest.raises(SortedChatError, match="--init-lenses: this run trains no lenses"):
        run(options(tiny_dir, alpaca_file, tmp_path / "x", method="sft", init_lenses=str(lens_run)))
    with pytest.raises(SortedChatError, match=r"--init-lenses .*: no sortedchat.json there"):
        run(options(tiny_dir, alpaca_file, tmp_path / "y", method="lens", objective="kd", init_lenses=str(tmp_path)))
    with pytest.raises(SortedChatError, match="has lenses at exits 4, which this run does not train"):
        run(options(tiny_dir, alpaca_file, tmp_path / "z", method="lens", objective="kd", exits=[2, 6],
                    init_lenses=str(lens_run)))


def test_soft_can_continue_a_saved_lora_adapter(tiny_dir, alpaca_file, tmp_path, monkeypatch):
    """--init-adapter: a second run continues the first's adapter (not a fresh one), and its KD teacher is
    still the base with the adapter off, so the cached top-K of the first run is the one it reads."""
    from sortedchat.training import teacher_cache

    first, second = tmp_path / "first", tmp_path / "second"
    kd = dict(method="soft", objective="kd", kd_top_k=16, kd_negatives=32, lora=True, lora_rank=4, lora_alpha=8)
    run(options(tiny_dir, alpaca_file, first, max_steps=3, lr=3e-2, **kd))
    trained = load_file(str(first / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in trained.items())
    teacher_files = sorted((tmp_path / "cache" / "teacher-top-k").iterdir())
    assert len(teacher_files) == 1
    base_top = teacher_cache.load(teacher_files[0])

    # a fresh cache: the second run computes its teacher again, with the (non-zero) adapter switched off
    monkeypatch.setenv("SORTEDCHAT_CACHE_DIR", str(tmp_path / "cache2"))
    computed = []
    real = teacher_cache.compute_top_k
    monkeypatch.setattr(teacher_cache, "compute_top_k", lambda *a, **k: computed.append(1) or real(*a, **k))
    run(options(tiny_dir, alpaca_file, second, max_steps=1, lr=1e-7, init_adapter=str(first), **kd))
    assert computed == [1]
    (again,) = (tmp_path / "cache2" / "teacher-top-k").iterdir()
    assert again.name == teacher_files[0].name
    second_top = teacher_cache.load(again)
    for a, b in zip(base_top.ids + base_top.logp, second_top.ids + second_top.logp):
        torch.testing.assert_close(a, b)
    # every weight's step is lr-sized (AdamW): at 1e-7 the adapter stays where the first run left it
    continued = load_file(str(second / "adapter_model.safetensors"))
    assert sorted(continued) == sorted(trained)
    for k in trained:
        torch.testing.assert_close(continued[k], trained[k], atol=1e-6, rtol=0)
    assert json.loads((second / "sortedchat.json").read_text())["training"]["options"]["init_adapter"] == str(first)

    with pytest.raises(SortedChatError, match="--init-adapter continues a LoRA adapter: add --lora"):
        run(options(tiny_dir, alpaca_file, tmp_path / "a", init_adapter=str(first)))
    with pytest.raises(SortedChatError, match=r"--init-adapter .*: no adapter_config.json there"):
        run(options(tiny_dir, alpaca_file, tmp_path / "b", init_adapter=str(tmp_path), **kd))
    with pytest.raises(SortedChatError, match=r"a LoRA adapter of rank 4, alpha 8; this run asks for "
                                              r"--lora-rank 8 --lora-alpha 8"):
        run(options(tiny_dir, alpaca_file, tmp_path / "c", init_adapter=str(first), **(kd | {"lora_rank": 8})))
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    deeper = tmp_path / "deeper-base"
    LlamaForCausalLM(AutoConfig.from_pretrained(tiny_dir, num_hidden_layers=8)).save_pretrained(deeper)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(deeper)
    deep_run = tmp_path / "deep"
    run(options(deeper, alpaca_file, deep_run, exits=[4, 8], max_steps=1, **kd))
    with pytest.raises(SortedChatError, match=r"--init-adapter .*: does not fit --model .*: \d+ of its weights "
                                              r"have no place in the model"):
        run(options(tiny_dir, alpaca_file, tmp_path / "d", init_adapter=str(deep_run), **kd))
    with pytest.raises(SortedChatError, match=r"--resume: .* was trained with init_adapter=None, this run has "
                                              r"init_adapter="):
        run(options(tiny_dir, alpaca_file, first, max_steps=3, lr=3e-2, resume=True, init_adapter=str(first), **kd))


def test_drift_measures_how_far_a_models_full_depth_moved_from_a_reference(tiny_dir, alpaca_file, tmp_path, capsys,
                                                                          monkeypatch):
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from sortedchat.training import drift

    other = tmp_path / "other"
    torch.manual_seed(1)
    LlamaForCausalLM(AutoConfig.from_pretrained(tiny_dir, initializer_range=0.2)).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(other)
    drift.main([str(tiny_dir), str(other), "--reference", str(tiny_dir), "--data", str(alpaca_file), "--limit", "3",
                "--max-length", "64"])
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "| model | top-1 same as reference | KL(reference ‖ model) | first answer token same |"
    assert rows[2] == f"| {tiny_dir} | 100.0% | 0.0000 | 100% |"
    name, top1, kl, _ = [c.strip() for c in rows[3].strip("|").split("|")]
    assert name == str(other) and float(top1.rstrip("%")) < 50 and float(kl) > 0.1

    reference = [torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])]
    model = [torch.tensor([[2.0, 1.0, 0.0], [3.0, 0.0, 1.0]])]
    d = drift.drift(reference, model)
    assert (d["top1"], d["first"], d["positions"]) == (0.5, 1.0, 2)
    p, q = reference[0][1].log_softmax(-1), model[0][1].log_softmax(-1)
    assert d["kl"] == pytest.approx(float((p.exp() * (p - q)).sum()) / 2)
    with pytest.raises(SystemExit, match=r"error: --data .*missing.json"):
        drift.main([str(tiny_dir), "--reference", str(tiny_dir), "--data", str(tmp_path / "missing.json")])

    from sortedchat import loading

    asked, real = [], loading.load_sorted_model
    monkeypatch.setattr(loading, "load_sorted_model",
                        lambda spec, o: asked.append(spec) or real(spec or str(tiny_dir), o))
    drift.main(["default", "--reference", "default", "--data", str(alpaca_file), "--limit", "1", "--max-length", "64"])
    assert asked == [None, None]  # "default" is the built-in model, never a hub id
    assert capsys.readouterr().out.splitlines()[2] == "| default | 100.0% | 0.0000 | 100% |"


def test_training_curves_table_and_plot_from_metrics(tmp_path):
    from sortedchat.training import curves

    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": 5, "loss": 1.0, "tokens": 1000}, {"step": 5, "eval": {"2": {"ce": 3.0, "agree": 0.25},
                                                                          "6": {"ce": 2.0, "agree": 1.0}}},
             {"step": 10, "loss": 0.8, "tokens": 2000}, {"step": 10, "eval": {"2": {"ce": 2.5, "agree": 0.5},
                                                                            "6": {"ce": 2.0, "agree": 1.0}}}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    evals = curves.read_evals(run)
    assert [(r["step"], r["tokens"], r["eval"][2]["agree"]) for r in evals] == [(5, 1000, 0.25), (10, 2000, 0.5)]
    assert curves.table("lens", evals).splitlines()[-1] == "| 10 | 2,000 | 50.0% | 100.0% |"
    curves.main([str(run), "--label", "lens", "--png", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_curves_by_exit_draw_one_panel_per_exit_and_one_line_per_run(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from sortedchat.training import curves

    for name, agree in (("a", 0.25), ("b", 0.5)):
        (tmp_path / name).mkdir()
        lines = [{"step": 5, "loss": 1.0, "tokens": 1000},
                 {"step": 5, "eval": {"2": {"agree": agree}, "4": {"agree": agree + 0.1}, "6": {"agree": 1.0}}}]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    figures = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, path, **kw: figures.append(fig))
    curves.main([str(tmp_path / "a"), str(tmp_path / "b"), "--exits", "2,4", "--png", str(tmp_path / "t.png")])
    axes = figures[0].axes
    assert [ax.get_title() for ax in axes] == ["exit 2", "exit 4"]
    assert [[ln.get_label() for ln in ax.get_lines()] for ax in axes] == [["a", "b"], ["a", "b"]]
    assert [list(ln.get_ydata()) for ln in axes[1].get_lines()] == [[pytest.approx(35.0)], [pytest.approx(60.0)]]
    with pytest.raises(SystemExit, match="--exits: expected layer numbers"):
        curves.main([str(tmp_path / "a"), "--exits", "21,x", "--png", str(tmp_path / "t.png")])


def test_training_curves_draw_a_continued_run_after_the_run_it_started_from(tmp_path, capsys, monkeypatch):
    from sortedchat.training import curves

    for name, rows in (("lens", [(60, 1000, 0.25), (120, 2000, 0.4)]), ("soft", [(50, 900, 0.45), (100, 1800, 0.5)])):
        (tmp_path / name).mkdir()
        lines = [x for step, tokens, agree in rows
                 for x in ({"step": step, "loss": 1.0, "tokens": tokens},
                           {"step": step, "eval": {"2": {"agree": agree}}})]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    chain = curves.read_chain(f"{tmp_path / 'lens'}+{tmp_path / 'soft'}")
    assert [(r["step"], r["tokens"], r["eval"][2]["agree"]) for r in chain] == [
        (60, 1000, 0.25), (120, 2000, 0.4), (170, 2900, 0.45), (220, 3800, 0.5)]
    (tmp_path / "lens+soft").mkdir()  # a run whose own name has a "+" is one run
    (tmp_path / "lens+soft" / "metrics.jsonl").write_text((tmp_path / "soft" / "metrics.jsonl").read_text())
    assert [r["step"] for r in curves.read_chain(str(tmp_path / "lens+soft"))] == [50, 100]
    assert [r.get("continues_at") for r in chain] == [None, None, 2000, None]
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda fig, path, **kw: figures.append(fig))
    curves.main([f"{tmp_path / 'lens'}+{tmp_path / 'soft'}", "--label", "lens, then soft", "--exits", "2",
                 "--png", str(tmp_path / "c.png")])
    assert "| 220 | 3,800 | 50.0% |" in capsys.readouterr().out
    (ax,) = figures[0].axes  # the agreement line, and a dotted mark where the soft run starts (2,000 tokens)
    assert [list(ln.get_xdata()) for ln in ax.get_lines()] == [[1.0, 2.0, 2.9, 3.8], [2.0, 2.0]]


def test_layer_dropout_skips_the_drawn_layers_for_one_step_and_exits_see_the_passed_state(tiny_dir, alpaca_file,
                                                                                          tmp_path):
    from sortedchat.training.trainer import Trainer

    sm, objective = objective_for(tiny_dir)
    encoded, batch = encoded_batch(sm)
    coefs = torch.ones(3)
    _, ce_skip, _ = objective(**batch, exits=[2, 4, 6], coefs=coefs, skip_layers=(2, 3))
    short = copy.deepcopy(sm.model)
    short.model.layers = torch.nn.ModuleList([short.model.layers[i] for i in (0, 1, 4, 5)])
    short.config.num_hidden_layers = 4
    assert ce_skip[2].item() / sum(e.targets for e in encoded) == pytest.approx(
        short(**batch, use_cache=False).loss.item(), rel=1e-5)
    _, ce_again, _ = objective(**batch, exits=[2, 4, 6], coefs=coefs)
    _, ce_plain, _ = objective_for(tiny_dir)[1](**batch, exits=[2, 4, 6], coefs=coefs)
    torch.testing.assert_close(ce_again, ce_plain)  # the hooks are gone after the call
    trainer = Trainer(options(tiny_dir, alpaca_file, tmp_path / "ld", layer_dropout=0.5))
    trainer.opts.layer_dropout, trainer.sm = 0.5, sm
    draws = [trainer.dropped_layers(s) for s in range(200)]
    assert draws == [trainer.dropped_layers(s) for s in range(200)]  # a function of (seed, step)
    rates = [sum(i in d for d in draws) / 200 for i in range(6)]
    assert rates[0] == 0 and rates[5] > rates[1] and abs(rates[5] - 0.5) < 0.12


def test_self_generated_replies_resume_and_the_corpus_loads_as_training_data(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sortedchat.training import selfgen
    from sortedchat.training.data import load_records

    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps(alpaca_records(5)))
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "Capital of France?", "answer": "Paris", "aliases": ["Paris"]}) + "\n"
                  + json.dumps({"question": "Odd line\u2028inside?", "answer": "Yes", "aliases": []}) + "\n")
    wiki = tmp_path / "wiki.txt"
    wiki.write_text(" ".join(f"Sentence number {i} says something about Paris." for i in range(60)) + "\n")
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    replies = tmp_path / "replies.jsonl"
    prompts = selfgen.alpaca_prompts(alpaca, 2, 6)
    assert [p.key for p in prompts] == ["alpaca:0", "alpaca:1", "alpaca:2"]  # the last 2 held out
    written = selfgen.generate(model, tok, prompts, replies, samples=2, batch_size=4, log=lambda m: None)
    records = [json.loads(x) for x in replies.read_text().splitlines()]
    assert written == len(records) and {r["source"] for r in records} <= {"alpaca:0", "alpaca:1", "alpaca:2"}
    again = selfgen.generate(model, tok, prompts, replies, samples=2, log=lambda m: None)
    assert again <= 6 - written  # a resumed run only answers what is missing (empty replies are not kept)
    written += again
    counts = selfgen.training_corpus(alpaca, qa, wiki, replies, 2, tmp_path / "train.jsonl")
    assert counts["alpaca"] == 3 and counts["questions"] == 2 and counts["passages"] >= 2
    assert counts["own replies"] == written
    loaded = load_records(str(tmp_path / "train.jsonl"))
    assert len(loaded.examples) == sum(counts.values())
    assert loaded.examples[3].messages[0]["content"] == "Capital of France?"


def test_drift_picks_its_records_as_eval_does(tiny_dir, alpaca_file, monkeypatch, capsys):
    """`--holdout N --limit M`: the last N records, then at most M of them (`data.last_records`)."""
    from sortedchat.training import drift, templates

    seen, real = [], templates.encode_all
    monkeypatch.setattr(templates, "encode_all", lambda records, *a: seen.append(records) or real(records, *a))
    drift.main([str(tiny_dir), "--reference", str(tiny_dir), "--data", str(alpaca_file), "--holdout", "3",
                "--limit", "2", "--max-length", "64"])
    everything = alpaca_records()
    assert [r.messages[-1]["content"] for r in seen[0]] == [r["output"] for r in everything[-3:-1]]
    assert capsys.readouterr().out.splitlines()[2] == f"| {tiny_dir} | 100.0% | 0.0000 | 100% |"
    with pytest.raises(SystemExit, match=rf"error: --holdout 99: {alpaca_file} has only {len(everything)} usable"):
        drift.main([str(tiny_dir), "--reference", str(tiny_dir), "--data", str(alpaca_file), "--holdout", "99"])


def test_self_generation_loads_as_the_command_line_does_and_errors_are_one_line(tiny_dir, alpaca_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from sortedchat.training import selfgen

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_dir, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict(), pickled / "pytorch_model.bin")
    out = tmp_path / "replies.jsonl"
    with pytest.raises(SystemExit, match=r"^error: .*pickle.*--allow-pickle"):
        selfgen.main(["--model", str(pickled), "--out", str(out), "--alpaca", str(alpaca_file)])
    with pytest.raises(SystemExit, match=rf"^error: --alpaca {tmp_path / 'missing.json'}: no such file$"):
        selfgen.main(["--model", str(tiny_dir), "--out", str(out), "--alpaca", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit, match=rf"^error: --out {tmp_path}: is a directory"):
        selfgen.main(["--model", str(tiny_dir), "--out", str(tmp_path), "--alpaca", str(alpaca_file)])
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "Hi", "output": "Hello"},\n {"instruction": "Hi" "output": "x"}]\n')
    with pytest.raises(SystemExit, match=rf"^error: {broken}: line 2: invalid JSON"):
        selfgen.main(["--model", str(tiny_dir), "--out", str(out), "--alpaca", str(broken)])
    with pytest.raises(SystemExit, match=rf"^error: --questions {alpaca_file}: expected qa records, found alpaca"):
        selfgen.main(["--model", str(tiny_dir), "--out", str(out), "--questions", str(alpaca_file)])
    assert not out.exists()
    selfgen.main(["--model", str(tiny_dir), "--out", str(out), "--alpaca", str(alpaca_file), "--alpaca-holdout", "0",
                  "--alpaca-limit", "2", "--batch-size", "2"])
    assert {json.loads(x)["source"] for x in out.read_text().splitlines()} <= {"alpaca:0", "alpaca:1"}
