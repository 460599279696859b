"""`sortedchat eval`: the per-exit table, JSON and plot, and closed-book exact match with TriviaQA normalisation."""

from __future__ import annotations

import json
import math
import os

import pytest
from typer.testing import CliRunner

from sortedchat.cli import app

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def train_tiny(tiny_dir, data, out, **kw):
    from rich.console import Console

    from sortedchat.training.recipe import resolve_options
    from sortedchat.training.trainer import train

    opts = dict(model=str(tiny_dir), data=str(data), out=str(out), exits=[2, 4, 6], batch_size=2, lr=1e-2,
                warmup_steps=0, device="cpu", max_length=64, max_steps=8)
    train(resolve_options(opts | kw), Console(file=open(os.devnull, "w")))
    return out


@pytest.mark.parametrize("text, normalised", [
    ("The Beatles!", "beatles"),
    ("  Paris,   France. ", "paris france"),
    ("an_apple a day", "apple day"),
    ("‘Rock’ `n´ roll", "rock n roll"),
    ("Theatre", "theatre"),
])
def test_triviaqa_normalisation(text, normalised):
    from sortedchat.training.evaluate import normalize_answer

    assert normalize_answer(text) == normalised


def test_exact_match_against_aliases():
    from sortedchat.training.evaluate import exact_match, first_answer_line

    aliases = ["Onion", "Allium cepa", "Bulb onion"]
    assert exact_match("The onion.", aliases) and exact_match("allium CEPA", aliases)
    assert not exact_match("Onions", aliases) and not exact_match("It is an onion", aliases)
    assert not exact_match("", ["", "the"])  # nothing is not an answer
    assert first_answer_line("\n  Paris \nbecause it is the capital") == "Paris"


def test_eval_compares_models_per_exit_and_writes_json_and_plot(tiny_dir, tmp_path):
    records = [{"instruction": "What is the capital of France?", "input": "",
                "output": "Paris is the capital of France."},
               {"instruction": "Hello!", "input": "", "output": "How are you today? I am fine, thank you."}] * 6
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    trained = train_tiny(tiny_dir, data, tmp_path / "soft", holdout=4)
    js, png = tmp_path / "eval.json", tmp_path / "eval.png"
    res = runner.invoke(app, ["eval", "-m", str(tiny_dir), "-m", str(trained), "--data", str(data), "--holdout", "4",
                              "--exits", "2,4,6", "--device", "cpu", "--json", str(js), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    rows = {line.split("│")[1].strip(): line for line in res.stdout.splitlines() if line.count("│") > 5}
    assert set(rows) == {"2", "4", "6"}
    text = "".join(res.stdout.split())
    assert "ACE" in text and "BCE" in text and "last4" in text
    assert f"A:{tiny_dir}" in text and f"B:{trained}" in text  # the caption names the models

    out = json.loads(js.read_text())
    assert out["data"]["records"] == 4 and out["data"]["holdout"] == 4
    base, soft = out["models"]
    assert base["model"] == str(tiny_dir) and soft["exits"] == [2, 4, 6]
    for m in (base, soft):
        assert m["metrics"]["6"]["agree"] == 1.0  # the last exit agrees with itself
        for e, v in m["metrics"].items():
            assert v["ppl"] == pytest.approx(math.exp(v["ce"])) and 0 <= v["top1"] <= 1
            assert f"{v['ce']:.3f}" in rows[e]
    for e in ("2", "4", "6"):  # SoFT training helped every exit on held-out data
        assert soft["metrics"][e]["ce"] < base["metrics"][e]["ce"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_qa_eval_scores_greedy_answers_per_exit(tiny_dir, tmp_path):
    qa = [{"question": "What is the capital of France?", "answer": "Paris", "aliases": ["Paris, France"]},
          {"question": "What jumps over the lazy dog?", "answer": {"value": "The quick brown fox", "aliases": ["fox"]}}]
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in qa * 8) + "\n")
    trained = train_tiny(tiny_dir, data, tmp_path / "qa-soft", max_steps=24, max_length=160)
    js = tmp_path / "qa.json"
    res = runner.invoke(app, ["eval", "-m", str(trained), "--data", str(data), "--limit", "2", "--device", "cpu",
                              "--json", str(js), "--max-new-tokens", "8"])
    assert res.exit_code == 0, res.output
    assert "EM" in res.stdout
    model = json.loads(js.read_text())["models"][0]
    predictions = model["predictions"]
    assert [p["aliases"] for p in predictions] == [["Paris", "Paris, France"], ["The quick brown fox", "fox"]]
    from sortedchat.training.evaluate import exact_match

    for e in ("2", "4", "6"):  # EM is exactly the share of that exit's answers that match an alias
        hits = sum(exact_match(p["answers"][e], p["aliases"]) for p in predictions)
        assert model["metrics"][e]["em"] == hits / 2
    assert model["metrics"]["6"]["em"] == 1.0, predictions  # memorised at full depth


def test_eval_rejects_qa_scoring_of_non_qa_data(tiny_dir, tmp_path):
    data = tmp_path / "a.json"
    data.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    res = runner.invoke(app, ["eval", "-m", str(tiny_dir), "--data", str(data), "--qa", "--device", "cpu"])
    assert res.exit_code != 0 and "holds alpaca records, not question/answer records" in str(res.exception)
