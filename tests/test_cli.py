"""The plain CLI on the tiny model: streamed answers, JSON events, info, and one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from sortedchat.cli import app

runner = CliRunner()


def cli(*args):
    return subprocess.run([sys.executable, "-m", "sortedchat", *map(str, args)], capture_output=True, text=True)


def test_ask_json_streams_events_at_the_requested_depth(tiny_dir):
    res = runner.invoke(app, ["ask", "Hello!", "--model", str(tiny_dir), "--device", "cpu", "--depth", "4",
                              "-n", "6", "--json"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    tokens = [x for x in lines if x["event"] == "token"]
    assert 1 <= len(tokens) <= 6 and {t["exit_layer"] for t in tokens} == {4}
    summary = lines[-1]
    assert summary["event"] == "summary" and summary["tokens"] == len(tokens)
    assert summary["mean_exit"] == 4.0 and summary["compute_saved"] == pytest.approx(1 - 4 / 6)


def test_ask_prints_answer_and_summary(tiny_dir):
    res = runner.invoke(app, ["ask", "Hello!", "--model", str(tiny_dir), "--device", "cpu", "-n", "5",
                              "--speculative", "2"])
    assert res.exit_code == 0, res.output
    assert "tok/s" in res.stdout and "mean exit" in res.stdout and "of drafts" in res.stdout


def test_draft_stop_must_be_a_probability(tiny_dir):
    res = cli("ask", "Hi", "--model", tiny_dir, "--device", "cpu", "--speculative", "2", "--draft-stop", "1.5")
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1] == "error: --draft-stop 1.5: must be a probability in 0..1"


def test_always_draft_needs_speculative(tiny_dir):
    res = runner.invoke(app, ["ask", "Hi", "--model", str(tiny_dir), "--device", "cpu", "--always-draft"])
    assert res.exit_code == 1 and str(res.exception) == "--always-draft needs --speculative"


def test_summary_says_how_many_tokens_pacing_decoded_at_full_depth():
    from sortedchat.cli.render import summary_parts
    from sortedchat.engine.events import GenerationStats

    stats = GenerationStats(num_layers=6, tokens=10, drafted=4, accepted=2, verifications=2, paced=5,
                            decode_seconds=1.0)
    assert summary_parts(stats)[-2:] == ["accepted 50% of drafts (1.00/verify)",
                                         "5 at full depth (drafting was slower)"]


def test_the_summary_breaks_lines_between_items_never_inside_one():
    from rich.console import Console

    from sortedchat.cli.render import AnswerPrinter, summary_parts
    from sortedchat.engine.events import GenerationStats

    stats = GenerationStats(num_layers=30, tokens=49, drafted=20, accepted=5, verifications=5, paced=44,
                            exit_sum=49 * 30, decode_seconds=8.6, layer_evals=49 * 35)
    console = Console(record=True, width=80)
    AnswerPrinter(30, 9, console=console).summary(stats)
    lines = console.export_text().strip().splitlines()
    assert len(lines) > 1 and all(len(line) <= 80 for line in lines)
    assert [item for line in lines for item in line.split(" · ")] == summary_parts(stats)


@pytest.mark.parametrize("command", [[], *([c] for c in
                                           ["chat", "ask", "info", "pull", "train", "eval", "bench", "calibrate"])])
def test_help_shows_flags_as_flags_arguments_in_capitals_and_every_help_text(command):
    res = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "80", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    assert "<bool>" not in res.stdout and "{" not in res.stdout
    assert all(len(line) <= 80 for line in res.stdout.splitlines())


def test_ask_help_reads_as_the_command_is_typed():
    text = runner.invoke(app, ["ask", "--help"], env={"COLUMNS": "80", "NO_COLOR": "1"}).stdout
    assert "Usage: sortedchat ask [OPTIONS] PROMPT" in text
    [json_row] = [line for line in text.splitlines() if "--json" in line]
    assert json_row.split()[1:4] == ["--json", "Print", "one"]  # a flag: no value type between
    assert "Usage: sortedchat pull [OPTIONS] [MODEL]" in runner.invoke(app, ["pull", "--help"]).stdout


def test_help_texts_in_brackets_and_docstrings_over_two_lines_show_whole():
    bench = " ".join(runner.invoke(app, ["bench", "--help"], env={"COLUMNS": "200"}).stdout.split())
    assert ".json [default: the built-in set]" in bench
    top = " ".join(runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).stdout.split())
    assert "for a target agreement; write them into the model's sortedchat.json." in top


def test_info_lists_layers_exits_and_weights(tiny_dir):
    res = runner.invoke(app, ["info", "--model", str(tiny_dir), "--device", "cpu", "--exits", "2,4"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.stdout.split())
    assert "layers 6" in out and "exits 2, 4, 6" in out and str(tiny_dir) in res.stdout.replace("\n", "")


def test_plain_chat_keeps_the_conversation(tiny):
    from rich.console import Console

    from sortedchat.cli.chat import plain_chat
    from sortedchat.engine import Mode, SamplingConfig

    lines = iter(["Hello!", "What is the capital of France?", "/quit"])
    console = Console(record=True, width=100)
    plain_chat(tiny, Mode.fixed(), SamplingConfig(max_new_tokens=4), console=console, read=lambda _: next(lines))
    out = console.export_text()
    assert out.count("mean exit") == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/no/such/dir"], "--model /no/such/dir: no such file or directory"),
        (["--exits", "2,9"], "--exits: exit 9 is outside 1..6"),
        (["--depth", "7"], "--depth 7: the model has 6 layers"),
        (["--auto", "--depth", "2"], "--depth, --auto and --speculative exclude each other"),
        (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tiny_dir, args, message):
    if "--model" not in args:
        args = ["--model", tiny_dir, *args]
    res = cli("ask", "Hi", "--device", "cpu", *args)
    assert res.returncode == 1
    [line] = res.stderr.strip().splitlines()
    assert line.startswith(f"error: {message}")


def test_prompt_longer_than_context(tiny, tiny_dir):
    from sortedchat.engine.context import encode_chat

    size = len(encode_chat(tiny, [{"role": "user", "content": "word " * 600}]))
    res = cli("ask", "word " * 600, "--model", tiny_dir, "--device", "cpu")  # -n 256: 128 (a quarter) kept
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr == (f"error: the message is {size} tokens (with the system prompt and chat markup); the model's "
                          "context holds 512 tokens and keeps 128 of them for the answer, so at most 384 fit\n")


LONG = "The quick brown fox jumps over the lazy dog. " * 3


def test_plain_chat_on_stdin_goes_on_when_the_chat_outgrows_the_context(tiny_dir):
    from sortedchat.tui.storage import ChatStore

    lines = [f"{i}. {LONG}" for i in range(1, 13)] + ["word " * 600, "Hi"]
    res = subprocess.run([sys.executable, "-m", "sortedchat", "chat", "--plain", "--model", str(tiny_dir), "--device",
                          "cpu", "-n", "8", "--system", "Be brief."], input="\n".join(lines) + "\n",
                         capture_output=True, text=True)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    out = " ".join(res.stdout.split())
    assert out.count("The model no longer sees turns 1–") == 1
    assert "they stay saved. The oldest turns keep dropping out as the chat goes on; /reset starts a new chat." in out
    assert "keeps 8 of them for the answer, so at most 504 fit; nothing was sent" in out
    assert out.count("mean exit") == 13  # every other line was answered, "Hi" after the refused one too
    [chat] = ChatStore().chats()
    users = [m.content for m in ChatStore().load(chat.id).messages if m.role == "user"]
    assert users == lines[:12] + ["Hi"]  # the refused line left no trace


def test_plain_chat_on_a_terminal_shows_a_long_prompt_pass(tiny):
    import io

    from rich.console import Console

    from sortedchat.cli.chat import plain_chat
    from sortedchat.engine import Mode, SamplingConfig
    from sortedchat.engine.context import encode_chat

    text = LONG * 7
    rest = len(encode_chat(tiny, [{"role": "user", "content": text}])) - 1
    screen = io.StringIO()
    lines = iter([text, "/quit"])
    console = Console(file=screen, force_terminal=True, width=200)
    plain_chat(tiny, Mode.fixed(), SamplingConfig(max_new_tokens=3), console=console, read=lambda _: next(lines))
    shown = screen.getvalue()
    assert f"reading the prompt: 0/{rest} tokens" in shown and f"reading the prompt: 256/{rest} tokens" in shown
    assert "reading the prompt" not in shown.rsplit("\x1b[2K", 1)[1]  # the answer's first token erased the line
    assert f"prompt {rest} tokens at " in shown and "context " in shown


def test_truncated_weights_are_a_clear_error(tiny_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    res = cli("info", "--model", bad, "--device", "cpu")
    assert res.returncode == 1
    assert res.stderr.startswith(f"error: {bad}: cannot load model weights")
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("how", [["--debug"], ["env"]])
def test_debug_shows_the_traceback_and_the_replaced_exception(tiny_dir, how):
    """`--exits x` replaces int()'s ValueError (`from None`); --debug / SORTEDCHAT_DEBUG=1 shows it, and still
    ends with the one-line error."""
    import os

    env = os.environ | ({"SORTEDCHAT_DEBUG": "1"} if how == ["env"] else {})
    flags = how if how == ["--debug"] else []
    res = subprocess.run([sys.executable, "-m", "sortedchat", *flags, "info", "--model", str(tiny_dir), "--exits", "x"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "ValueError: invalid literal for int()" in res.stderr
    assert res.stderr.strip().splitlines()[-1] == "error: --exits: expected comma-separated layer numbers, got 'x'"


def test_calibrate_limit_needs_enough_records(tiny_dir, tmp_path):
    """(`--max-examples`, its old name, went in issue 23.)"""
    data = tmp_path / "d.txt"
    data.write_text("one\ntwo\n")
    res = cli("calibrate", "--model", tiny_dir, "--data", data, "--limit", "2")
    assert res.returncode == 1
    assert res.stderr.strip() == "error: --limit 2: at least 4 are needed"
