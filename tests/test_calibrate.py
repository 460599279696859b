"""`sortedchat calibrate`: thresholds written into sortedchat.json and used by the reloaded model."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys

import pytest
import torch

from sortedchat import SortedChatError
from sortedchat import calibrate as cal
from sortedchat.bench.costs import Costs
from sortedchat.config import CONFIG_NAME
from sortedchat.engine import ChatSession, Mode, SamplingConfig
from sortedchat.engine.confidence import CLASSIFIER_NAME, Measure
from sortedchat.engine.context import encode_chat
from sortedchat.loading import LoadOptions, load_sorted_model

from helpers.data import CALIBRATION_RECORDS


def run_cli(monkeypatch, capsys, *args):
    """`sortedchat ARGS` in-process, as the console script runs it: (exit code, stdout, stderr)."""
    from sortedchat.cli import main

    monkeypatch.setattr(sys, "argv", ["sortedchat", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def model_dir(tiny_dir, tmp_path):
    path = tmp_path / "tiny"
    shutil.copytree(tiny_dir, path)
    return path


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "held_out.json"
    path.write_text(json.dumps(CALIBRATION_RECORDS))
    return path


def auto_exits(sm, mode):
    session = ChatSession(sm, mode)
    session.stop_ids = set()
    ids = encode_chat(sm, [{"role": "user", "content": "Hello! How are you today?"}])
    return [e.exit_layer for e in session.generate_ids(ids, SamplingConfig(max_new_tokens=16))]


@pytest.mark.parametrize("measure", ["maxprob", "subset", "classifier", "saturation"])
def test_calibrate_writes_thresholds_that_the_reloaded_model_uses(monkeypatch, capsys, model_dir, data, measure):
    real = cal.measure_costs

    def free_checks(*args, **kwargs):
        """The measured costs, but checks and backlogs free: whether an exit pays off on the tiny model would
        otherwise hang on timing noise (that rule has its own tests below)."""
        costs = real(*args, **kwargs)
        return dataclasses.replace(costs, drain=0.0, check=dict.fromkeys(costs.check, 0.0))

    monkeypatch.setattr(cal, "measure_costs", free_checks)
    code, out, err = run_cli(monkeypatch, capsys, "calibrate", "--model", model_dir, "--data", data, "--device", "cpu",
                             "--exits", "2,4,6", "--target-agreement", "0.05", "--measure", measure)
    assert code == 0, err
    saved = json.loads((model_dir / CONFIG_NAME).read_text())
    assert saved["confidence"] == measure and saved["exits"] == [2, 4, 6]
    thresholds = {int(k): v for k, v in saved["thresholds"].items()}
    assert set(thresholds) == {2, 4} and thresholds[2] < 1.0  # a 5% target lets the first exit take tokens
    assert saved["calibration"]["target_agreement"] == 0.05
    assert saved["calibration"]["expected"][measure]["agreement"] >= 0.0
    assert saved["calibration"]["quantized"] == "none"  # the costs and agreement of float32 products
    assert (model_dir / CLASSIFIER_NAME).is_file() == (measure == "classifier")
    assert str(model_dir / CONFIG_NAME) in out.replace("\n", "")

    sm = load_sorted_model(str(model_dir), LoadOptions(device="cpu"))
    assert sm.config.confidence == measure and sm.thresholds() == {**thresholds, 6: 0.0}
    exits = auto_exits(sm, Mode.auto())
    assert 2 in exits  # the calibrated first exit takes tokens ...
    assert set(auto_exits(sm, Mode.auto(threshold=1.0))) == {6}  # ... which full-depth thresholds would not


def test_calibrate_without_model_writes_into_the_default_model_dir(monkeypatch, capsys, model_dir, data):
    import sortedchat.default_model as dm

    monkeypatch.setattr(dm, "default_model_dir", lambda progress=None: model_dir)
    code, out, err = run_cli(monkeypatch, capsys, "calibrate", "--data", data, "--device", "cpu",
                             "--target-agreement", "0.5", "--measure", "subset")
    assert code == 0, err
    assert json.loads((model_dir / CONFIG_NAME).read_text())["confidence"] == "subset"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target-agreement", "1.5"], "--target-agreement 1.5: must be in (0, 1]"),
        (["--measure", "entropy"], "--measure 'entropy': choose maxprob, subset, classifier, saturation"),
        (["--holdout", "99"], "--holdout 99:"),
    ],
)
def test_calibrate_bad_options_are_one_line(monkeypatch, capsys, model_dir, data, args, message):
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", "--model", model_dir, "--data", data,
                           "--device", "cpu", *args)
    last = err.strip().splitlines()[-1]  # (transformers may draw a progress bar first)
    assert code == 1 and last.startswith("error: ") and message in last
    assert not (model_dir / CONFIG_NAME).exists()


def test_calibrate_bad_record_names_file_and_line(monkeypatch, capsys, model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "Hi", "output": "Hello"}\n{"instruction": "Hi"}\n')
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", "--model", model_dir, "--data", bad, "--device", "cpu")
    assert code == 1 and f"{bad}: line 2" in err


def test_plain_text_data_is_scored_as_documents(tiny, tmp_path):
    text = tmp_path / "docs.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n\nHello! How are you today?\n" * 2)
    sequences, described = cal.reference_sequences(tiny, str(text), max_examples=10)
    assert described["format"] == "text" and len(sequences) == 4
    assert all(start == 0 for _, start in sequences)
    assert sequences[0][0] == tiny.tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]


def test_thresholds_follow_a_separating_confidence():
    """Exit 2's confidence separates agreeing tokens perfectly: they all leave there, nothing else does."""
    costs = Costs(layer=1.0, head=2.0, step=0.0, context=0, check={"m": 0.01}, per_token={"m": 0.0})
    agree2 = torch.tensor([True] * 6 + [False] * 4)
    conf = torch.stack([torch.where(agree2, 0.9, 0.2), torch.full((10,), 0.3)])
    agree = torch.stack([agree2, torch.zeros(10, dtype=torch.bool)])
    th = cal.thresholds_for_precision(conf, agree, [2, 4], precision=0.9, costs=costs, measure="m", L=6)
    assert th == [pytest.approx(0.9), 1.0]  # exit 4 never agrees: not checked
    sim = cal.simulate(conf, agree, [2, 4], th, costs, "m", L=6)
    assert sim["agreement"] == 1.0 and sim["mean_exit"] == pytest.approx(0.6 * 2 + 0.4 * 6)
    seconds = 0.6 * (2 + 2) + 0.4 * (6 + 2) + 0.01  # every token is checked once, at exit 2
    assert sim["speedup"] == pytest.approx(8 / seconds)


def test_draining_the_backlog_shrinks_what_an_early_exit_saves():
    """An early token's layers run later, batched with the next deeper token: at drain d they cost d of a
    layer each. Half-price draining halves the saving; full-price draining makes checking pointless."""
    agree2 = torch.tensor([True] * 6 + [False] * 4)
    conf = torch.stack([torch.where(agree2, 0.9, 0.2), torch.full((10,), 0.3)])
    agree = torch.stack([agree2, torch.zeros(10, dtype=torch.bool)])
    half = Costs(layer=1.0, head=2.0, step=0.0, context=0, drain=0.5, check={"m": 0.01}, per_token={"m": 0.0})
    th = cal.thresholds_for_precision(conf, agree, [2, 4], precision=0.9, costs=half, measure="m", L=6)
    sim = cal.simulate(conf, agree, [2, 4], th, half, "m", L=6)
    seconds = 0.6 * (8 - 4 * 0.5) + 0.4 * 8 + 0.01
    assert th[0] == pytest.approx(0.9) and sim["speedup"] == pytest.approx(8 / seconds)
    full = Costs(layer=1.0, head=2.0, step=0.0, context=0, drain=1.0, check={"m": 0.01}, per_token={"m": 0.0})
    assert cal.thresholds_for_precision(conf, agree, [2, 4], precision=0.9, costs=full, measure="m", L=6) == [1.0, 1.0]


def test_too_little_data_is_refused(tiny, tmp_path):
    small = tmp_path / "small.json"
    small.write_text(json.dumps(CALIBRATION_RECORDS[:2]))
    with pytest.raises(SortedChatError, match="2 usable examples; calibration needs at least 4"):
        cal.reference_sequences(tiny, str(small), max_examples=10)


def test_plan_meets_the_target_on_held_out_positions():
    """A calibrated measure (P(agree) = confidence): the plan lands on the target, not far above it."""
    g = torch.Generator().manual_seed(0)
    n = 8000
    conf = torch.rand(2, n, generator=g)
    agree = torch.rand(2, n, generator=g) < conf
    split = torch.tensor([cal.SPLIT_OF[i % len(cal.SPLIT_OF)] for i in range(n)])
    obs = cal.Observations([2, 4], agree, split, {"m": conf})
    costs = Costs(layer=1.0, head=2.0, step=0.0, context=0, check={"m": 0.01}, per_token={"m": 0.0})
    plan = cal.plan(obs, conf, "m", 0.9, costs, 6, choose_on=obs.part("fit") | obs.part("select"))
    assert plan.agreement == pytest.approx(0.9, abs=0.02)
    assert 0.0 < plan.thresholds[2] < 1.0 and plan.speedup > 1.2
    assert plan.per_exit[2]["share"] > 0.2


class Margin(Measure):
    """A confidence measure defined here only: the gap between the two most likely tokens of the exit's full
    head. Registered for one test, it must work in calibrate and auto mode with no other module changed."""

    name = "margin"

    @staticmethod
    def record(view):
        top2 = torch.softmax(view.logits.float(), dim=-1).topk(2, dim=-1).values
        return {"margin": top2[..., 0] - top2[..., 1]}

    def score(self, records, exit_layer):
        return records["margin"]


def test_a_measure_registered_in_confidence_alone_is_calibrated_and_used_by_auto_mode(monkeypatch, capsys,
                                                                                      model_dir, data):
    from sortedchat.engine import confidence as c

    monkeypatch.setitem(c.MEASURES, "margin", Margin)
    costs = Costs(layer=1.0, head=2.0, step=0.0, context=0, check={"margin": 0.0}, per_token={"margin": 0.0})
    monkeypatch.setattr(cal, "measure_costs", lambda *args, **kwargs: costs)  # whether exits pay is tested above
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", "--measure", "wrong", "--model", model_dir, "--data", data)
    assert code == 1 and "--measure 'wrong': choose maxprob, subset, classifier, saturation, margin" in err
    code, out, err = run_cli(monkeypatch, capsys, "calibrate", "--model", model_dir, "--data", data, "--device", "cpu",
                             "--exits", "2,4,6", "--target-agreement", "0.05", "--measure", "margin")
    assert code == 0, err
    saved = json.loads((model_dir / CONFIG_NAME).read_text())
    assert saved["confidence"] == "margin" and saved["calibration"]["expected"]["margin"]["agreement"] >= 0.0
    thresholds = {int(k): v for k, v in saved["thresholds"].items()}
    assert thresholds[2] < 1.0

    sm = load_sorted_model(str(model_dir), LoadOptions(device="cpu"))
    checked, call = [], Margin.__call__

    def recorded(measure, hidden, exit_layer):
        checked.append(exit_layer)
        return call(measure, hidden, exit_layer)

    monkeypatch.setattr(Margin, "__call__", recorded)
    exits = auto_exits(sm, Mode.auto())
    assert 2 in checked and 2 in exits  # auto mode checks the margin, and the calibrated first exit takes tokens
    prompt = encode_chat(sm, [{"role": "user", "content": "Hello"}])
    obs = cal.observe(sm, [(prompt + [40, 50, 60], len(prompt) - 1)], kinds=[Margin])
    assert set(obs.records) == {"margin"} and obs.records["margin"].shape == (2, 3)
    assert torch.equal(cal.confidences(obs, Margin(sm)), obs.records["margin"])
