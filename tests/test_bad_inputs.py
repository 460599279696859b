"""The bad-input matrix: each fault that once ended in a traceback or lost work, one case per row.

Every case does what the user did and checks what they see (a one-line error naming what was wrong
and where, or a note in the app) and that nothing is lost (messages saved, files kept, results
written somewhere). The rows follow issue 13's list; `test_bad_input[NN-...]` runs one of them.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from sortedchat import SortedChatError
from sortedchat.config import SortedConfig
from sortedchat.tui.app import SortedChatApp
from sortedchat.tui.screens.chats import ChatListScreen
from sortedchat.tui.storage import ChatStore

from helpers.tui import ask, dialogue, run_async, wait_for
from helpers.tui import make_app as base_app

SIZE = (110, 34)
CASES = {}


def case(name):
    def register(fn):
        CASES[name] = fn
        return fn

    return register


def cli(*args, stdin: bytes | None = None, env: dict | None = None):
    """`sortedchat ARGS` in a subprocess: bytes out, so invalid UTF-8 stays visible."""
    argv = [a if isinstance(a, bytes) else os.fsencode(str(a)) for a in args]
    return subprocess.run([sys.executable, "-m", "sortedchat", *argv], input=stdin,
                          capture_output=True, env={**os.environ, **(env or {})})


def one_error_line(res, progress: bool = False) -> str:
    """The single error line a failed command printed on stderr (with `progress`, after its progress notes)."""
    assert res.returncode == 1, (res.returncode, res.stderr)
    lines = res.stderr.decode().strip().splitlines()
    assert len(lines) == 1 or progress and not any(line.startswith("error:") for line in lines[:-1]), lines
    return lines[-1]


def make_app(tiny, store, export_dir) -> SortedChatApp:
    """The chat app on the tiny model, recording what it tells the user in `app.notes`."""
    app = base_app(tiny, export_dir, max_new_tokens=4, store=store)
    app.notes = []
    notify = app.notify

    def record(message, **kwargs):
        app.notes.append(str(message))
        return notify(message, **kwargs)

    app.notify = record
    return app


def run_app(app, script):
    @run_async
    async def go():
        async with app.run_test(size=SIZE) as pilot:
            await script(pilot)
            assert app.is_running  # nothing above ended the app


def damage(path: Path) -> bytes:
    """Overwrite 8 KB after the header page of a closed SQLite file (its header stays valid)."""
    data = bytearray(path.read_bytes())
    data[4096 : 4096 + 8192] = b"\xa5" * 8192
    path.write_bytes(bytes(data))
    return bytes(data)


def store_with_chats(path: Path, chats: int = 30) -> None:
    store = ChatStore(path)
    for i in range(chats):
        chat = store.new_chat(f"chat {i}", "tiny")
        store.start_answer(chat, [{"role": "user", "content": "words " * 200}], "", "tiny")
    store.close()


# -- 1. deleting the open chat ---------------------------------------------------------------------
@case("01-delete-open-chat")
def _(tiny, tmp_path):
    store = ChatStore(tmp_path / "chats.sqlite3")
    app = make_app(tiny, store, tmp_path)

    async def script(pilot):
        await ask(pilot, app, "Hello there")
        first = dialogue(app).chat_id
        await pilot.press("ctrl+l", "d")
        assert [c.id for c in store.chats()] == [first]  # one `d` only asks
        await pilot.press("d", "escape")
        assert store.chats() == []
        await ask(pilot, app, "Again")
        assert dialogue(app).history[0] == {"role": "user", "content": "Again"}  # a new conversation
        [saved] = store.chats()
        assert [m.role for m in store.load(saved.id).messages] == ["user", "assistant"]
        assert store.load(saved.id).messages[0].content == "Again"

    run_app(app, script)


# -- 2. a damaged chat database ---------------------------------------------------------------------
def _damaged_store(tmp_path):
    path = tmp_path / "chats.sqlite3"
    store_with_chats(path)
    return path, damage(path)


def _kept_aside(path: Path, damaged: bytes) -> None:
    [aside] = path.parent.glob("chats.sqlite3.damaged-*[0-9]")
    assert aside.read_bytes() == damaged  # never written to


@case("02a-damaged-db-send")
def _(tiny, tmp_path):
    path, damaged = _damaged_store(tmp_path)
    store = ChatStore(path)
    app = make_app(tiny, store, tmp_path)

    async def script(pilot):
        await ask(pilot, app, "Hello there")
        assert any("damaged" in n and "kept it as chats.sqlite3.damaged-" in n for n in app.notes), app.notes
        [saved] = store.chats()
        assert [m.content for m in store.load(saved.id).messages][0] == "Hello there"

    run_app(app, script)
    _kept_aside(path, damaged)


@case("02b-damaged-db-chat-list")
def _(tiny, tmp_path):
    path, damaged = _damaged_store(tmp_path)
    app = make_app(tiny, ChatStore(path), tmp_path)

    async def script(pilot):
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: isinstance(app.screen, ChatListScreen))
        assert any("damaged" in n for n in app.notes), app.notes
        await pilot.press("escape")
        await ask(pilot, app, "Hello there")
        assert len(app.store.chats()) == 1

    run_app(app, script)
    _kept_aside(path, damaged)


# -- 4. export from the saved-chats screen ----------------------------------------------------------
@case("04a-export-target-is-a-directory")
def _(tiny, tmp_path):
    app = make_app(tiny, ChatStore(tmp_path / "chats.sqlite3"), tmp_path)

    async def script(pilot):
        await ask(pilot, app, "Hello there")
        (tmp_path / app.store.export_name(dialogue(app).chat_id)).mkdir()
        await pilot.press("ctrl+l", "e")
        assert any(n.startswith("export failed: ") and "Is a directory" in n for n in app.notes), app.notes
        assert isinstance(app.screen, ChatListScreen)

    run_app(app, script)


@case("04b-export-names-survive-reused-ids")
def _(tmp_path):
    store = ChatStore(tmp_path / "chats.sqlite3")
    first = store.new_chat("first", "tiny")
    name = store.export_name(first)
    store.delete_chat(first)
    time.sleep(1.1)  # export names count seconds
    second = store.new_chat("second", "tiny")
    assert second == first  # SQLite hands the id out again
    assert store.export_name(second) != name


# -- 3. prompts that are not UTF-8 ---------------------------------------------------------------------
@case("03a-ask-invalid-utf8")
def _(tiny_dir):
    res = cli("ask", b"hello \xff\xfe world", "--model", tiny_dir, "--device", "cpu")
    assert one_error_line(res) == "error: the prompt: not valid UTF-8 (byte 0xff at character 7)"


@case("03b-ask-json-encoded-surrogate")
def _(tiny_dir):
    res = cli("ask", b"\xed\xa0\x80 hi", "--json", "--model", tiny_dir, "--device", "cpu")
    assert one_error_line(res) == "error: the prompt: not valid UTF-8 (byte 0xed at character 1)"
    assert res.stdout == b""


@case("03c-plain-chat-invalid-utf8-line")
def _(tiny_dir):
    res = cli("chat", "--plain", "--model", tiny_dir, "--device", "cpu", "-n", "3",
              stdin=b"hello \xff world\nHi\n")
    out = res.stdout.decode()
    assert res.returncode == 0, res.stderr
    assert "that line: not valid UTF-8 (byte 0xff at character 7); nothing was sent" in out
    assert out.count("mean exit") == 1  # the session went on and answered "Hi"
    [saved] = ChatStore().chats()
    assert [m.content for m in ChatStore().load(saved.id).messages][:1] == ["Hi"]


# -- 5. outputs that cannot be written -----------------------------------------------------------------
READ_ONLY = Path("/proc/sortedchat-results.json")  # refuses new files, even to root


@case("05a-train-out-is-a-file")
def _(tiny_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "Hi", "output": "Hello"}) + "\n")
    out = tmp_path / "out"
    out.write_text("my notes")
    res = cli("train", "--model", tiny_dir, "--data", data, "--out", out, "--device", "cpu", "--max-steps", "1")
    assert one_error_line(res) == f"error: --out {out}: is a file, not a directory"
    assert out.read_text() == "my notes"


@case("05b-train-out-read-only")
def _(tiny_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "Hi", "output": "Hello"}) + "\n")
    res = cli("train", "--model", tiny_dir, "--data", data, "--out", "/proc/sortedchat-run", "--device", "cpu")
    assert one_error_line(res).startswith("error: --out /proc/sortedchat-run: cannot write there (")


def _eval_args(tiny_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}", "output": w}) + "\n" for w in ("hi", "yes")))
    return ["eval", "--model", tiny_dir, "--data", data, "--device", "cpu", "--max-length", "32"]


@case("05c-eval-json-is-a-directory")
def _(tiny_dir, tmp_path):
    res = cli(*_eval_args(tiny_dir, tmp_path), "--json", tmp_path)
    assert one_error_line(res) == f"error: --json {tmp_path}: is a directory; give a file name"
    assert res.stdout == b""  # refused before the evaluation ran


@case("05d-eval-json-read-only")
def _(tiny_dir, tmp_path):
    res = cli(*_eval_args(tiny_dir, tmp_path), "--json", READ_ONLY)
    assert one_error_line(res).startswith(f"error: --json {READ_ONLY}: cannot write there (")
    assert res.stdout == b""


@case("05e-bench-json-is-a-directory")
def _(tiny_dir, tmp_path):
    target = tmp_path / "results.json"
    target.mkdir()
    res = cli("bench", "--model", tiny_dir, "--device", "cpu", "--json", target, "-n", "2", "-r", "1")
    assert one_error_line(res) == f"error: --json {target}: is a directory; give a file name"
    assert res.stdout == b""


@case("05f-eval-results-rescued-when-writing-fails-anyway")
def _(tiny_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sortedchat import config
    from sortedchat.cli import app

    target = tmp_path / "results.json"
    write = config.atomic_write_text

    def disk_full(path, text):  # the check before the run passed; the disk filled up during it
        if Path(path) == target:
            raise OSError(28, "No space left on device")
        return write(path, text)

    monkeypatch.setattr(config, "atomic_write_text", disk_full)
    res = CliRunner().invoke(app, [*map(str, _eval_args(tiny_dir, tmp_path)), "--json", str(target)])
    assert res.exit_code == 1 and isinstance(res.exception, SortedChatError), res.output
    message = str(res.exception)
    assert message.startswith(f"--json {target}: cannot write (No space left on device); the results are in ")
    rescued = json.loads(Path(message.rsplit("the results are in ", 1)[1]).read_text())
    assert rescued["data"]["records"] == 2 and not target.exists()


# -- 6. checkpoints -----------------------------------------------------------------------------------------
def _train(tiny_dir, tmp_path, *extra):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}", "output": w}) + "\n" for w in ("hi", "yes") * 4))
    out = tmp_path / "run"
    return out, cli("train", "--model", tiny_dir, "--data", data, "--out", out, "--device", "cpu", "--exits", "2,4,6",
                    "--batch-size", "2", "--max-length", "32", "--save-interval", "1", *extra)


@case("06a-resume-from-a-checkpoint-without-weights")
def _(tiny_dir, tmp_path):
    out, res = _train(tiny_dir, tmp_path, "--max-steps", "2", "--keep-checkpoints", "2")
    assert res.returncode == 0, res.stderr
    newest = out / "checkpoints" / "step-00000002"
    [weights] = newest.glob("model*.safetensors")
    weights.unlink()
    _, res = _train(tiny_dir, tmp_path, "--max-steps", "3", "--keep-checkpoints", "2", "--resume")
    assert one_error_line(res, progress=True) == (f"error: --resume: {newest} is incomplete ({weights.name} is "
                                                  "missing); delete that folder to resume from step-00000001")


@case("06b-pruning-killed-half-way-leaves-no-checkpoint-lookalike")
def _(tiny_dir, tmp_path, monkeypatch):
    import shutil

    from sortedchat.training import checkpoints

    rmtree = shutil.rmtree

    def killed(path, ignore_errors=False):  # pruning deletes one file, then the process dies
        if "step-00000001" not in str(path):
            return rmtree(path, ignore_errors=ignore_errors)
        next(p for p in Path(path).rglob("*.safetensors")).unlink()
        raise KeyboardInterrupt

    out, res = _train(tiny_dir, tmp_path, "--max-steps", "1")
    assert res.returncode == 0, res.stderr

    class Acc:
        is_main_process = True

        def wait_for_everyone(self):
            pass

        def save_state(self, path):
            shutil.copytree(out / "checkpoints" / "step-00000001", path, dirs_exist_ok=True)

    monkeypatch.setattr(checkpoints.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(Acc(), out, 2, {"step": 2}, keep=1)
    assert [p.name for _, p in checkpoints.checkpoint_dirs(out)] == ["step-00000002"]


# -- 7. Ctrl+Q while the model loads ------------------------------------------------------------------------
QUIT_WHILE_LOADING = """
import asyncio, threading
from pathlib import Path
from sortedchat.tui.app import SortedChatApp
from sortedchat.tui.screens.loading import LoadingScreen
from sortedchat.tui.storage import ChatStore

def loader(progress):  # a first-run conversion that takes long
    progress("converting the default model", 0.1)
    threading.Event().wait(600)

app = SortedChatApp(loader=loader, store=ChatStore(Path({db!r})))

async def run():
    async with app.run_test(size=(80, 24)) as pilot:
        while not isinstance(app.screen, LoadingScreen):
            await pilot.pause(0.05)
        await pilot.press("ctrl+q")
        await pilot.pause(0.2)
        print("running" if app.is_running else "quit")

asyncio.run(run())
"""


@case("07-ctrl-q-while-loading")
def _(tmp_path):
    code = QUIT_WHILE_LOADING.format(db=str(tmp_path / "chats.sqlite3"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["quit"], done.stderr


# -- 8. key remaps ---------------------------------------------------------------------------------------------
def _config(tmp_path, text):
    from sortedchat.tui.settings import load_settings

    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(SortedChatError) as err:
        load_settings(path)
    return path, str(err.value)


@case("08a-remap-to-a-printable-key")
def _(tmp_path):
    path, message = _config(tmp_path, '[chat]\ntemperature = 0.5\n\n[keys]\nquit = "a"\n')
    assert message == (f'{path}: line 5: [keys] quit = "a" types a character, so the message box could not have it; '
                       "use a function key or a ctrl+ or alt+ combination")


@case("08b-remap-onto-another-actions-key")
def _(tmp_path):
    path, message = _config(tmp_path, '[keys]\nquit = "f2"\n')
    assert message == (f'{path}: line 2: [keys] quit = "f2" is already the key of shallower; '
                       'give one of them another key')


# -- 9. thresholds in sortedchat.json ---------------------------------------------------------------------------
@case("09-thresholds-out-of-range")
def _(tiny_dir, tmp_path):
    import shutil

    for value in (1.5, -0.2):
        model = tmp_path / f"model{value}"
        shutil.copytree(tiny_dir, model)
        SortedConfig(exits=[2, 4, 6], thresholds={2: value, 4: 0.9}).write(model)
        res = cli("ask", "Hi", "--model", model, "--device", "cpu", "--auto")
        assert one_error_line(res) == f"error: {model / 'sortedchat.json'}: 'thresholds' 2: {value} is outside 0..1"


# -- 10. chat --plain keeps its history -----------------------------------------------------------------------------
@case("10-plain-chat-is-saved")
def _(tiny):
    from rich.console import Console

    from sortedchat.cli.chat import plain_chat
    from sortedchat.engine import Mode, SamplingConfig

    lines = iter(["Hello!", "What is the capital of France?", "/reset", "Again", "/quit"])
    console = Console(record=True, width=100)
    plain_chat(tiny, Mode.fixed(4), SamplingConfig(max_new_tokens=4), console=console, read=lambda _: next(lines))
    store = ChatStore()  # the user's history, where the app looks
    chats = sorted(store.chats(), key=lambda c: c.id)
    assert [c.title for c in chats] == ["Hello!", "Again"]
    first = store.load(chats[0].id).messages
    assert [m.role for m in first] == ["user", "assistant", "user", "assistant"]
    assert all(m.mode == "Depth 4/6" and m.stats["tokens"] == len(m.tokens) for m in first[1::2])
    assert "saved to the chat history" in console.export_text()


# -- 11. the layer-call contract ---------------------------------------------------------------------------------------
@case("11a-engine-calls-layers-without-deprecated-names")
def _(tiny):
    from transformers import GenerationConfig

    from sortedchat.engine import ChatSession, SamplingConfig
    from sortedchat.engine.context import encode_chat

    messages = [{"role": "user", "content": "Hello there"}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated keyword is an error here
        events = list(ChatSession(tiny).generate(messages, SamplingConfig(max_new_tokens=8)))
    import torch

    ids = torch.tensor([encode_chat(tiny, messages)])
    want = tiny.model.generate(ids, generation_config=GenerationConfig(max_new_tokens=8, do_sample=False,
                                                                       eos_token_id=tiny.tokenizer.eos_token_id))
    assert [e.token_id for e in events] == want[0, ids.shape[1]:].tolist()[: len(events)]


@case("11b-ask-prints-no-library-warning")
def _(tiny_dir):
    res = cli("ask", "Hello there", "--model", tiny_dir, "--device", "cpu", "-n", "4", env={"PYTHONWARNINGS": ""})
    assert res.returncode == 0 and res.stderr == b"", res.stderr.decode()


# -- 12. JSONL with U+0085 / U+2028 inside strings -----------------------------------------------------------
@case("12-jsonl-line-separators-inside-strings")
def _(tmp_path):
    from sortedchat.training.data import load_records

    data = tmp_path / "data.jsonl"
    records = [{"instruction": "Say\u0085hi", "output": "hi\u2028there"},
               {"instruction": "Two\u2029", "output": "x\x0cy"}]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    got = load_records(str(data)).examples
    assert [(e.messages[0]["content"], e.messages[1]["content"]) for e in got] == [
        ("Say\u0085hi", "hi\u2028there"), ("Two\u2029", "x\x0cy")]
    assert [e.where for e in got] == [f"{data}: line 1", f"{data}: line 2"]


# -- first use --------------------------------------------------------------------------------------------------
@case("first-use-help-imports-no-torch")
def _():
    code = "import sys, sortedchat.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stderr


@case("first-use-depth-checked-before-loading")
def _(tiny_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")  # loading would fail: the check comes first
    res = cli("ask", "Hi", "--model", broken, "--device", "cpu", "--depth", "31")
    assert one_error_line(res) == "error: --depth 31: the model has 6 layers"
    for command in (["ask", "Hi"], ["info"], ["bench"]):
        res = cli(*command, "--model", broken, "--device", "cpu", "--exits", "2,9")
        assert one_error_line(res).startswith("error: --exits: exit 9 is outside 1..6")


@case("first-use-default-model-depth-checked-before-loading")
def _():
    res = subprocess.run([sys.executable, "-m", "sortedchat", "ask", "Hi", "--depth", "31"], capture_output=True,
                         timeout=60)  # the default model would be converted first (minutes) without the check
    assert one_error_line(res) == "error: --depth 31: the model has 30 layers"


@case("first-use-gguf-depth-checked-before-loading")
def _(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "model.gguf"  # a header a converter would take a while to find broken tensors behind
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list(["a", "bb", "ccc"])  # an array before the layer count, as real files have
    writer.add_block_count(7)
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    res = cli("ask", "Hi", "--model", path, "--depth", "8")
    assert one_error_line(res) == "error: --depth 8: the model has 7 layers"


# -- issue 21: faults that lost work or crashed ---------------------------------------------------------------
def _in_process(*args):
    """`sortedchat ARGS` in this process (so a test can simulate a fault): the result, its error as a string."""
    from typer.testing import CliRunner

    from sortedchat.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    error = res.exception
    assert error is None or isinstance(error, SortedChatError), res.output  # never a traceback
    return res, str(error) if error else ""


def _calibrate(tiny_dir, tmp_path):
    import shutil

    from helpers.data import CALIBRATION_RECORDS

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    data = tmp_path / "held_out.json"
    data.write_text(json.dumps(CALIBRATION_RECORDS))
    return model, ["calibrate", "--model", model, "--data", data, "--device", "cpu", "--exits", "2,4,6",
                   "--measure", "maxprob"]


@case("21a-calibrate-read-only-model-refused-before-the-work")
def _(tiny_dir, tmp_path, monkeypatch):
    import errno
    import tempfile

    from sortedchat import outputs

    model, args = _calibrate(tiny_dir, tmp_path)
    real = tempfile.mkstemp

    def read_only(dir=None, **kw):  # as a read-only mount answers (root ignores permission bits, so simulated)
        if Path(dir) == model:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(dir=dir, **kw)

    monkeypatch.setattr(outputs.tempfile, "mkstemp", read_only)
    res, error = _in_process(*args)
    assert res.exit_code == 1 and error == f"calibration writes sortedchat.json into {model}: cannot write there " \
                                           "(Read-only file system)"
    assert res.stdout == ""  # refused before the calibration ran and printed


@case("21b-calibrate-thresholds-rescued-when-writing-fails-at-the-end")
def _(tiny_dir, tmp_path, monkeypatch):
    import errno

    from sortedchat import config

    model, args = _calibrate(tiny_dir, tmp_path)
    write = config.atomic_write_text

    def disk_full(path, text):  # the check before the work passed; the disk filled up during it
        if Path(path).parent == model:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(path, text)

    monkeypatch.setattr(config, "atomic_write_text", disk_full)
    res, error = _in_process(*args)
    assert res.exit_code == 1 and error.startswith(f"--model {model}: cannot write (No space left on device); "
                                                   "the results are in ")
    rescued = SortedConfig.read(error.rsplit("the results are in ", 1)[1])
    assert rescued.confidence == "maxprob" and set(rescued.thresholds) == {2, 4}
    assert not (model / "sortedchat.json").exists()


@case("21c-chat-history-deleted-while-the-app-is-open")
def _(tiny, tmp_path):
    path = tmp_path / "chats.sqlite3"
    app = make_app(tiny, ChatStore(path), tmp_path)

    async def script(pilot):
        await ask(pilot, app, "Hello there")
        for part in tmp_path.glob("chats.sqlite3*"):
            part.unlink()
        await ask(pilot, app, "Again")
        assert any(n == f"{path} was deleted while the app was open; a new chat history starts there; saving this "
                   "conversation as a new chat" for n in app.notes), app.notes
        [saved] = ChatStore(path).chats()
        messages = ChatStore(path).load(saved.id).messages
        assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
        assert [m.content for m in messages[::2]] == ["Hello there", "Again"] and all(m.content for m in messages)

    run_app(app, script)


@case("21d-first-conversion-on-a-full-disk")
def _(tmp_path):
    from safetensors import SafetensorError

    from sortedchat import convert

    target = tmp_path / "cache" / "models" / "model"

    def fill(tmp):  # what save_pretrained raises when the disk fills up under it
        (tmp / "model.safetensors").write_bytes(b"the first megabytes")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(SortedChatError) as err:
        convert.build_dir(target, fill, needs="538 MB")
    assert str(err.value) == (f"cannot write model into {target.parent} (No space left on device); it needs about "
                              "538 MB there: free some space, or set SORTEDCHAT_CACHE_DIR to a folder with room")
    assert list(target.parent.iterdir()) == []  # no half-written copy, not even hidden


@case("21e-cache-or-config-folder-is-a-file")
def _(tiny_dir, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    res = cli("ask", "Hi", "-m", tiny_dir, "--device", "cpu", env={"SORTEDCHAT_CACHE_DIR": str(a_file)})
    assert res.returncode == 0  # a plain directory needs no cache
    res = cli("ask", "Hi", env={"SORTEDCHAT_CACHE_DIR": str(a_file)})
    assert one_error_line(res) == f"error: SORTEDCHAT_CACHE_DIR={a_file}: is a file, not a folder"
    res = cli("chat", "--plain", "-m", tiny_dir, "--device", "cpu", env={"SORTEDCHAT_CONFIG_DIR": str(a_file)},
              stdin=b"Hi\n")
    assert one_error_line(res) == f"error: SORTEDCHAT_CONFIG_DIR={a_file}: is a file, not a folder"
    assert a_file.read_text() == "mine"


@case("21f-non-finite-numbers")
def _(tiny_dir, tmp_path):
    for value in ("nan", "inf"):
        res = cli("ask", "Hi", "-m", tiny_dir, "--device", "cpu", "--temperature", value)
        assert one_error_line(res) == f"error: --temperature must be a finite number >= 0, got {value}"
    res = cli("train", "--model", tiny_dir, "--data", tmp_path / "none.jsonl", "--out", tmp_path / "run", "--lr", "nan")
    assert one_error_line(res) == "error: --lr: must be a finite number, got nan"
    config = tmp_path / "config"
    config.mkdir()
    (config / "config.toml").write_text("[chat]\ntemperature = nan\n")
    res = cli("chat", "--plain", "-m", tiny_dir, "--device", "cpu", env={"SORTEDCHAT_CONFIG_DIR": str(config)},
              stdin=b"Hi\n")
    assert one_error_line(res) == f"error: {config / 'config.toml'}: line 2: [chat] temperature must be a finite " \
                                  "number, got nan"
    assert ChatStore().chats() == []  # refused before anything was saved


@case("21g-ask-an-empty-prompt")
def _(tiny_dir):
    for prompt in ("", "   "):
        res = cli("ask", prompt, "-m", tiny_dir, "--device", "cpu")
        assert one_error_line(res) == 'error: the prompt is empty; give a question, e.g. sortedchat ask "What is SoFT?"'
        assert res.stdout == b""


@case("21h-sortedchat-json-that-makes-no-sense")
def _(tiny_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    path = model / "sortedchat.json"
    for fields, message in [
        ({"format": 99}, "'format' 99 is not one this sortedchat reads (1..1; a newer sortedchat may have written it)"),
        ({"exits": []}, "'exits' is empty (list the exit layers, or leave the field out for the default exits)"),
        ({"exits": [2, 4, 6], "thresholds": {"3": 0.5}}, "'thresholds' 3: layer 3 is not one of the exits 2, 4, 6"),
        ({"confidence": "vibes"}, "'confidence' 'vibes' is not a confidence measure (choose maxprob, subset, "
                                  "classifier, saturation)"),
    ]:
        path.write_text(json.dumps(fields))
        res = cli("ask", "Hi", "--model", model, "--device", "cpu")
        assert one_error_line(res) == f"error: {path}: {message}"


@case("21i-an-uncached-hub-id-never-reaches-the-network")
def _():
    for offline in ("", "0"):  # unset in the shell's way, or turned off: only `pull` downloads
        res = cli("ask", "Hi", "--model", "someone/not-cached", env={"HF_HUB_OFFLINE": offline})
        assert one_error_line(res) == ("error: --model someone/not-cached: not a local path, and not in the local "
                                       "hub cache (run `sortedchat pull someone/not-cached` to download it)")


@case("21j-the-gguf-conversion-reports-progress-and-prints-no-bar")
def _(capfd):
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from sortedchat.convert import _tensor_progress

    seen, real = [], gguf_utils.tqdm
    with _tensor_progress(lambda stage, fraction: seen.append((stage, fraction)), "dequantizing tensor", 0.1, 0.7):
        assert list(gguf_utils.tqdm(["a", "b", "c"], desc="Converting and de-quantizing GGUF tensors...")) == \
            ["a", "b", "c"]  # the loop transformers runs over a GGUF's tensors
    assert seen == [("dequantizing tensor 1/3", pytest.approx(0.3)), ("dequantizing tensor 2/3", pytest.approx(0.5)),
                    ("dequantizing tensor 3/3", pytest.approx(0.7))]
    assert gguf_utils.tqdm is real and capfd.readouterr().err == ""


@case("21k-a-long-step-that-reports-nothing-still-moves-the-display")
def _():
    import threading

    from sortedchat.convert import _ticking

    seen, ticked = [], threading.Event()

    def progress(stage, fraction):
        seen.append((stage, fraction))
        ticked.set()

    with _ticking(progress, "reading model.gguf", 0.05, every=0.01):
        assert ticked.wait(10)  # the GGUF header is being parsed, and the display moves
    assert seen[0] == ("reading model.gguf (0 s)", 0.05)  # seconds, rounded: this test ticks every 10 ms
    count = len(seen)
    threading.Event().wait(0.05)
    assert len(seen) == count  # the ticks end with the block


@case("21l-library-log-lines-stay-off-the-terminal")
def _(tiny_dir, tmp_path):
    bad = tmp_path / "data.parquet"
    bad.write_text("not parquet")
    res = cli("eval", "--model", tiny_dir, "--data", bad, "--device", "cpu")
    assert one_error_line(res) == (f"error: --data {bad}: cannot load dataset (Parquet magic bytes not found in "
                                   "footer. Either the file is corrupted or this is not a parquet file.)")
    # bitsandbytes, imported with peft (the default model's adapter), warns about an optional kernel package
    code = "import sortedchat.loading, bitsandbytes.backends.cpu.ops"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr


@case("21m-torch-says-a-write-failed-without-saying-why")
def _(tmp_path, monkeypatch):
    from sortedchat import outputs

    seen = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1081664 vs 1081552")  # full tmpfs
    monkeypatch.setattr(outputs, "_full", lambda folder: folder == tmp_path)
    assert outputs.write_error(seen, tmp_path) == "No space left on device"
    assert outputs.write_error(seen, tmp_path / "other") == "torch could not write a file: unexpected pos 1081664"
    assert outputs.write_error(RuntimeError("CUDA out of memory"), tmp_path) is None  # not a write: raised as it is


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, request):
    fn = CASES[name]
    fn(**{p: request.getfixturevalue(p) for p in inspect.signature(fn).parameters})
