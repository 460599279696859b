"""`--threads` on every command that runs a model: torch runs with the count asked for, `info` shows it, a count
below 1 is a one-line error; the command line bounds how long torch's waiting threads spin unless the user chose."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from sortedchat.cli import app
from sortedchat.cli.options import usable_cpus

runner = CliRunner()


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("command", ["ask", "chat", "info", "eval", "calibrate", "bench", "serve"])
def test_every_command_that_runs_a_model_takes_threads(command):
    text = " ".join(runner.invoke(app, [command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"}).stdout.split())
    assert "--threads" in text


def test_ask_runs_torch_with_the_threads_asked_for(tiny_dir, restore_threads):
    torch.set_num_threads(2)
    res = runner.invoke(app, ["ask", "Hello!", "--model", str(tiny_dir), "--device", "cpu", "-n", "3", "--json",
                              "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert torch.get_num_threads() == 1


def test_info_shows_the_thread_count(tiny_dir, restore_threads):
    res = runner.invoke(app, ["info", "--model", str(tiny_dir), "--threads", "1"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    row = next(line for line in res.stdout.splitlines() if line.strip().startswith("threads"))
    assert row.split()[1] == "1" and f"on {usable_cpus()} CPUs" in row


@pytest.mark.parametrize("command", ["ask", "eval"])
def test_more_threads_than_cpus_is_one_warning_line_before_loading(command, tiny_dir, tmp_path, restore_threads):
    """Threads beyond the CPUs this process may use take turns and wait for each other: the command still runs,
    and says so once; as many threads as CPUs is no warning."""
    data = tmp_path / "d.json"
    data.write_text('[{"instruction": "Say hi.", "input": "", "output": "hi."}]')
    args = {"ask": ["ask", "Hello!", "-n", "3"],
            "eval": ["eval", "--data", str(data), "--json", str(tmp_path / "o.json")]}[command]
    cpus = usable_cpus()
    warned = []
    for threads in (cpus + 1, cpus):
        res = runner.invoke(app, [*args, "--model", str(tiny_dir), "--device", "cpu", "--threads", str(threads)])
        assert res.exit_code == 0, res.output
        warned.append([line for line in res.stderr.splitlines() if "--threads" in line])
    assert warned == [[f"warning: --threads {cpus + 1} is more than the {cpus} CPUs this process may use: threads "
                       "that share a CPU wait for each other, and the model runs slower, not faster"], []]


def test_threads_below_one_is_a_one_line_error(tiny_dir):
    res = subprocess.run([sys.executable, "-m", "sortedchat", "ask", "Hi", "--model", str(tiny_dir), "--threads", "0"],
                         capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.strip() == "error: --threads 0: must be at least 1"


@pytest.mark.parametrize("env, spin", [({}, "30000"), ({"OMP_WAIT_POLICY": "ACTIVE"}, None),
                                       ({"GOMP_SPINCOUNT": "1000"}, "1000")])
def test_waiting_threads_spin_briefly_unless_the_user_chose(env, spin):
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = "import os, sortedchat.cli; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env=clean | env, capture_output=True, text=True).stdout
    assert out.strip() == str(spin)
