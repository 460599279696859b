"""`sortedchat bench` end to end on the tiny model, and its prompt files."""

from __future__ import annotations

import json
import sys
import time

import pytest

from sortedchat import SortedChatError
from sortedchat.bench.prompts import DEFAULT_PROMPTS, load_prompts


def invoke(argv: list[str]) -> tuple[int, str, str]:
    """`sortedchat ARGV` in-process, as the console script runs it: (exit code, stdout, stderr)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout
    from unittest import mock

    from sortedchat.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    with mock.patch.object(sys, "argv", ["sortedchat", *map(str, argv)]), redirect_stdout(out), redirect_stderr(err):
        try:
            main()
        except SystemExit as exc:
            code = exc.code or 0
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def bench_run(tiny_dir, tmp_path_factory):
    """One bench run (2 prompts, 6 tokens, 1 repeat) shared by the tests below."""
    tmp = tmp_path_factory.mktemp("bench")
    prompts = tmp / "prompts.txt"
    prompts.write_text("# two prompts\nWhat is the capital of France?\n\nHello! How are you today?\n")
    out_json, out_png = tmp / "bench.json", tmp / "bench.png"
    code, out, err = invoke(["bench", "--model", tiny_dir, "--device", "cpu", "--exits", "2,4,6", "--prompts", prompts,
                             "-n", "6", "--repeat", "1", "--clock", "cpu", "--json", out_json, "--plot", out_png])
    assert code == 0, err
    return json.loads(out_json.read_text()), out_png, out


def test_bench_json_has_every_mode(bench_run):
    data, _, _ = bench_run
    keys = [r["key"] for r in data["rows"]]
    assert keys == ["hf", "hf-ee:2", "hf-ee:4", "full", "depth:2", "depth:4", "auto", "auto:propagate", "spec:2",
                    "spec:4", "draft:2", "draft:4"]
    assert data["max_new_tokens"] == 6 and data["repeat"] == 1 and data["prompts"] == 2 and data["clock"] == "cpu"
    for r in data["rows"]:
        assert r["tokens_per_second"] > 0 and r["ratio"] > 0 and 0.0 <= r["agreement"] <= 1.0
        assert r["clock"] == "cpu" and r["ratio"] == r["by_clock"]["cpu"]["ratio"]
        assert r["by_clock"]["wall"]["tokens_per_second"] > 0
        assert r["peak_memory_mib"] is None or r["peak_memory_mib"] > 0
        # decoding alone: our engine times each answer from its first token; `generate` hands the answer over whole,
        # speculative rounds hand over their tokens together
        untimed = r["key"].startswith(("hf", "spec", "draft"))
        assert (r["decode_tokens_per_second"] is None) == untimed, r["key"]
        assert r["decode_tokens_per_second"] is None or r["decode_tokens_per_second"] > 0
    assert data["machine"]["cpu_count"] >= 1 and data["costs"]["layer"] >= 0 and data["costs"]["head"] > 0


def test_bench_exact_modes_agree_with_the_baseline(bench_run):
    rows = {r["key"]: r for r in bench_run[0]["rows"]}
    for key in ("hf", "full", "spec:2", "spec:4", "draft:2", "draft:4", "hf-ee:2", "hf-ee:4"):
        assert rows[key]["agreement"] == 1.0, key
    for key in ("spec:2", "spec:4", "draft:2", "draft:4"):
        assert rows[key]["acceptance"] is not None and 0.0 <= rows[key]["acceptance"] <= 1.0
        if key.startswith("draft"):  # always drafting: every verification is counted
            assert rows[key]["accepted_per_verification"] is not None and rows[key]["accepted_per_verification"] >= 0
    for key in ("spec:2", "spec:4"):
        assert 0.0 <= rows[key]["paced_share"] < 1.0
    assert rows["draft:2"]["paced_share"] is None
    assert rows["depth:2"]["mean_exit"] == 2.0 and rows["full"]["mean_exit"] == 6.0
    assert rows["hf"]["ratio"] == 1.0


def test_bench_teacher_forced_agreement_and_auto_against_the_fixed_depth_line(bench_run):
    data = bench_run[0]
    rows = {r["key"]: r for r in data["rows"]}
    assert rows["full"]["forced_agreement"] == 1.0
    for key in ("depth:2", "depth:4", "auto", "auto:propagate"):
        assert 0.0 <= rows[key]["forced_agreement"] <= 1.0
        assert rows[key]["forced_agreement"] >= rows[key]["agreement"] or rows[key]["agreement"] == 1.0
    for key in ("hf", "hf-ee:2", "spec:2", "draft:2"):
        assert rows[key]["forced_agreement"] is None
    verdicts = data["auto_vs_fixed"]
    assert set(verdicts) == {"exact", "propagate"}
    for kv, by_name in verdicts.items():
        assert set(by_name) == {"free-running", "teacher-forced"}
        for name, v in by_name.items():
            assert v["dominates"] == (v["auto"] > v["fixed_depth_line"])
            assert (kv in data["auto_dominating"][name]) == v["dominates"]
    flat = " ".join(bench_run[2].split())
    assert "auto (exact K/V) at" in flat and "auto (propagate K/V) at" in flat
    assert "verdict, teacher-forced agreement:" in flat and "verdict, free-running agreement:" in flat


def make_row(kind, ratio, agree=0.0, forced=None, ideal=None):
    """A bench row with only what the report's arithmetic reads."""
    from sortedchat.bench.runner import Row

    return Row(key=kind, label=kind, kind=kind, exit=3, clock="wall", tokens_per_second=1.0, ratio=ratio,
               decode_tokens_per_second=None, agreement=agree, forced_agreement=forced, mean_exit=None, acceptance=None,
               accepted_per_verification=None, paced_share=None,
               peak_memory_mib=None, ideal_ratio=ideal, check_share=None, checks_per_token=None, by_clock={})


def test_fixed_depth_line_interpolates_between_fixed_depths():
    from sortedchat.bench.report import auto_vs_fixed, fixed_depth_line

    rows = [make_row("full", 1.0, 1.0, 1.0), make_row("depth", 1.2, 0.0, 0.5), make_row("depth", 2.0, 0.0, 0.1),
            make_row("auto", 1.1, 0.2, 0.9)]
    assert fixed_depth_line(rows, 1.1, "agreement") == pytest.approx(0.5)
    assert fixed_depth_line(rows, 1.1, "forced_agreement") == pytest.approx(0.75)
    assert fixed_depth_line(rows, 0.9, "agreement") == 1.0 and fixed_depth_line(rows, 3.0, "agreement") == 0.0
    verdicts = auto_vs_fixed(rows)["exact"]
    assert verdicts["free-running"]["dominates"] is False and verdicts["teacher-forced"]["dominates"] is True


def test_verdict_names_which_kv_way_of_auto_dominates_the_fixed_depth_line():
    from dataclasses import replace

    from sortedchat.bench.report import auto_vs_fixed, dominating, verdict_line

    line = [make_row("full", 1.0, 1.0, 1.0), make_row("depth", 2.0, 0.0, 0.0)]  # forced: 1 - (ratio - 1)
    exact = replace(make_row("auto", 1.1, 0.2, 0.95), kv="exact")  # the line: 0.9 at 1.1x
    propagate = replace(make_row("auto", 1.5, 0.1, 0.4), kv="propagate")  # the line: 0.5 at 1.5x
    ways = dominating(auto_vs_fixed([*line, exact, propagate]))
    assert ways == {"free-running": [], "teacher-forced": ["exact"]}
    assert verdict_line("teacher-forced", ways["teacher-forced"], ["exact", "propagate"]) == (
        "verdict, teacher-forced agreement: exact auto dominates the fixed-depth line, propagate auto does not")
    assert verdict_line("free-running", [], ["exact", "propagate"]) == (
        "verdict, free-running agreement: exact and propagate auto do not dominate the fixed-depth line")
    assert verdict_line("x", ["exact", "propagate"], ["exact", "propagate"]) == (
        "verdict, x agreement: exact and propagate auto dominate the fixed-depth line")


def test_percent_of_ideal_is_the_speed_up_over_our_full_depth_against_the_ideal_one():
    from sortedchat.bench.report import of_ideal_ratio

    full, depth = make_row("full", 1.2, ideal=1.0), make_row("depth", 1.8, ideal=2.0)
    assert of_ideal_ratio(depth, [full, depth]) == pytest.approx(1.8 / 1.2 / 2.0)
    assert of_ideal_ratio(full, [full, depth]) is None


def test_mean_exit_counts_an_accepted_early_exit_draft_at_its_exit_and_other_hf_tokens_at_full_depth():
    from sortedchat.bench.runner import ModeSpec, RowKind, Tally, mean_exit

    tally = Tally(tokens=[6, 4], accepted=4)
    assert mean_exit(ModeSpec("hf-ee:2", "", RowKind.HF_EE, 2), tally, 6) == (4 * 2 + 6 * 6) / 10
    assert mean_exit(ModeSpec("hf", "", RowKind.HF, 6), tally, 6) == 6.0
    auto = ModeSpec("auto", "", RowKind.AUTO)
    assert mean_exit(auto, Tally(exit_sum=9, exit_tokens=3), 6) == 3.0 and mean_exit(auto, Tally(), 6) is None


def test_bench_modes_keeps_the_baseline_and_full_depth_and_names_unknown_modes(tiny_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello!\n")
    out_json = tmp_path / "b.json"
    base = ["bench", "--model", tiny_dir, "--device", "cpu", "--exits", "2,4,6", "--prompts", prompts, "-n", "3",
            "--repeat", "1"]
    code, _, err = invoke([*base, "--modes", "spec:4,auto", "--json", out_json])
    assert code == 0, err
    assert [r["key"] for r in json.loads(out_json.read_text())["rows"]] == ["hf", "full", "auto", "spec:4"]
    code, _, err = invoke([*base, "--modes", "spec:5"])
    assert code == 1
    assert err.strip().splitlines()[-1] == ("error: --modes: unknown mode 'spec:5' (this model has hf, hf-ee:2, "
                                            "hf-ee:4, full, depth:2, depth:4, auto, auto:propagate, spec:2, spec:4, "
                                            "draft:2, draft:4)")


def test_bench_ideal_ratio_comes_from_layer_and_head_cost(bench_run):
    data = bench_run[0]
    layer, head = data["costs"]["layer"], data["costs"]["head"]
    for r in data["rows"]:
        if r["kind"] in ("full", "depth"):
            assert r["ideal_ratio"] == pytest.approx((6 * layer + head) / (r["exit"] * layer + head))
        elif r["kind"] in ("hf", "hf-ee", "spec", "draft"):
            assert r["ideal_ratio"] is None


def test_bench_writes_a_png_and_prints_the_table(bench_run):
    data, png, out = bench_run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    flat = " ".join(out.split())
    threads = data["machine"]["torch_threads"]
    assert f"float32 on cpu ({threads} thread{'s' * (threads != 1)})" in flat
    assert (data["quantization"], data["quantized"]) == ("none", "none")
    for label in ("hf generate", "hf early-exit 2", "depth 6", "depth 2", "auto", "speculative 4"):
        assert label in flat, label


def test_bench_refuses_a_wrong_output_name_before_loading(tiny_dir):
    code, _, err = invoke(["bench", "--model", tiny_dir, "--json", "out.txt"])
    assert code == 1 and err.strip() == "error: --json out.txt: expected a .json file name"


def test_bench_skips_the_llama_cpp_row_in_one_line_without_the_package(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` fails as if it were not installed
    prompts, out_json = tmp_path / "p.txt", tmp_path / "b.json"
    prompts.write_text("Hello!\n")
    code, _, err = invoke(["bench", "--model", tiny_dir, "--device", "cpu", "--prompts", prompts, "-n", "2",
                           "--repeat", "1", "--modes", "", "--json", out_json])
    assert code == 0, err
    line = "llama.cpp row skipped: llama-cpp-python is not installed (pip install 'sortedchat[peer]')"
    assert [x for x in err.splitlines() if "llama.cpp" in x] == [line]
    data = json.loads(out_json.read_text())
    assert [r["key"] for r in data["rows"]] == ["hf", "full"] and data["full_vs_peer"] is None
    assert data["peer"]["skipped"] == line.split(": ", 1)[1]


def test_a_model_without_a_gguf_has_no_peer_row(bench_run):
    data = bench_run[0]
    assert data["peer"]["gguf"] is None and data["peer"]["skipped"] and data["full_vs_peer"] is None
    assert "peer" not in {r["kind"] for r in data["rows"]}


def test_the_peer_runs_the_gguf_behind_the_model_option(tmp_path):
    from sortedchat.bench.peer import gguf_for
    from sortedchat.default_model import find_installed_gguf

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert gguf_for(str(gguf)) == gguf and gguf_for(str(tmp_path)) is None and gguf_for("org/model") is None
    assert gguf_for(None) == find_installed_gguf()


@pytest.mark.slow
@pytest.mark.usefixtures("default_model_here")
def test_llama_cpp_row_beside_our_full_depth_on_the_default_gguf(tmp_path):
    pytest.importorskip("llama_cpp", reason="the optional extra `peer` (llama-cpp-python) is not installed")
    prompts, out_json = tmp_path / "p.txt", tmp_path / "b.json"
    prompts.write_text("Why is the sky blue?\n")
    code, out, err = invoke(["bench", "--prompts", prompts, "-n", "4", "--repeat", "1", "--modes", "", "--threads",
                             "1", "--json", out_json])
    assert code == 0, err
    data = json.loads(out_json.read_text())
    peer = next(r for r in data["rows"] if r["key"] == "llama.cpp")
    assert peer["kind"] == "peer" and peer["tokens_per_second"] > 0 and data["peer"]["threads"] == 1
    # where this llama.cpp crashed on a batched prompt (a Xeon with AMX), one line says so and what to compare
    said = [x for x in err.splitlines() if "crashed on a batched prompt" in x]
    assert said == (["llama.cpp crashed on a batched prompt here: its prompts went in one token at a time (its whole "
                     "answers are slower for it; decoding alone compares the engines)"]
                    if data["peer"]["prompt_batch"] == 1 else [])
    versus, full = data["full_vs_peer"], next(r for r in data["rows"] if r["key"] == "full")
    assert versus["ratio"] > 0 and versus["decode_peer"] == peer["decode_tokens_per_second"] > 0
    assert versus["decode_ratio"] == pytest.approx(full["decode_tokens_per_second"] / versus["decode_peer"])
    line = next(x for x in " ".join(out.split()).split("our full depth ")[1:] if "against llama.cpp's" in x)
    assert (f"{versus['ratio']:.2f}x; decoding alone (prompt and first token left out) {versus['decode_full']:.1f} "
            f"against {versus['decode_peer']:.1f} tok/s: {versus['decode_ratio']:.2f}x") in line


def test_decoding_alone_counts_the_tokens_after_each_answers_first():
    from sortedchat.bench.runner import Tally, decode_speed

    # 2 answers of 5 tokens a repeat: 8 tokens after the first ones, over 2 s and then 4 s of decoding
    assert decode_speed(Tally(tokens=[10, 10], decode_seconds=[2.0, 4.0]), answers=2) == pytest.approx(3.0)
    assert decode_speed(Tally(tokens=[10], decode_seconds=[None]), answers=2) is None  # `generate`
    assert decode_speed(Tally(), answers=2) is None


def test_an_answer_is_timed_from_its_first_token_to_its_last():
    from types import SimpleNamespace

    import torch

    from sortedchat.bench.runner import Bench

    bench = Bench.__new__(Bench)
    bench.sm = SimpleNamespace(device=torch.device("cpu"))

    def tokens(n, pause):
        for i in range(n):
            if i:
                time.sleep(pause)
            yield i

    out, seconds, decoded = bench._timed(tokens(3, 0.05))
    assert out == [0, 1, 2] and 0.1 <= decoded <= seconds["wall"]
    assert bench._timed(tokens(1, 0.0))[::2] == ([0], None) and bench._timed(tokens(0, 0.0))[::2] == ([], None)


def test_the_summary_line_sets_decoding_alone_beside_the_whole_answer():
    import io
    from dataclasses import replace

    from rich.console import Console

    from sortedchat.bench.report import full_vs_peer, print_table

    full, peer = make_row("full", 1.0), make_row("peer", 1.0)
    rows = [replace(full, tokens_per_second=50.0, decode_tokens_per_second=60.0),
            replace(peer, tokens_per_second=80.0, decode_tokens_per_second=120.0)]
    assert full_vs_peer(rows) == {"full": 50.0, "peer": 80.0, "ratio": 0.625, "decode_full": 60.0,
                                  "decode_peer": 120.0, "decode_ratio": 0.5}
    console = Console(file=io.StringIO(), width=300)
    print_table(rows, "t", console)
    assert ("our full depth 50.0 tok/s against llama.cpp's 80.0 tok/s on the same GGUF and threads: 0.62x; decoding "
            "alone (prompt and first token left out) 60.0 against 120.0 tok/s: 0.50x") in console.file.getvalue()
    rows[1] = replace(rows[1], decode_tokens_per_second=None)
    assert full_vs_peer(rows)["decode_ratio"] is None


def test_default_prompts_are_varied_chat_questions():
    prompts = load_prompts()
    assert len(prompts) >= 6
    lengths = sorted(len(p[-1]["content"]) for p in prompts)
    assert lengths[-1] > 4 * lengths[0]
    assert all(p[-1]["role"] == "user" for p in prompts)
    assert DEFAULT_PROMPTS.name == "prompts.txt"


def test_prompt_files_jsonl_and_json(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "Hi"}\n\n{"messages": [{"role": "system", "content": "Be brief."}, '
                     '{"role": "user", "content": "Why?"}]}\n"plain"\n')
    assert load_prompts(jsonl) == [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
        [{"role": "user", "content": "plain"}],
    ]
    js = tmp_path / "p.json"
    js.write_text('["One?", {"prompt": "Two?"}]')
    assert [p[0]["content"] for p in load_prompts(js)] == ["One?", "Two?"]


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": \n', "bad.jsonl: line 2: invalid JSON"),
        ("bad.jsonl", '{"prompt": "ok"}\n{"text": "x"}\n', "bad.jsonl: line 2: expected a non-empty 'prompt'"),
        ("bad.jsonl", '{"messages": [{"role": "assistant", "content": "x"}]}\n', "line 1: the conversation must end"),
        ("bad.json", '{"prompt": "x"}', "bad.json: expected a JSON list"),
        ("empty.txt", "# only a comment\n\n", "no prompts in the file"),
    ],
)
def test_bad_prompt_files_name_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SortedChatError, match=message.replace("(", r"\(")):
        load_prompts(path)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(SortedChatError, match="--prompts .*nope.txt: cannot read"):
        load_prompts(tmp_path / "nope.txt")
