"""The `sortedchat` command. Each sub-command lives in its own module and registers itself here.

Errors a user can fix (`SortedChatError`) print as one line on stderr with exit code 1 (`--debug` adds the
traceback, see `debug`); Ctrl+C exits 130.
"""

from __future__ import annotations

import importlib
import sys

from sortedchat.cli.help_format import SortedChatTyper

app = SortedChatTyper(
    name="sortedchat",
    help="Chat with a Sorted Fine-Tuned model whose depth adapts per token, and train one.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
)

def _quiet_libraries() -> None:
    """Our own progress displays replace the libraries' tqdm bars and warnings on the terminal, and
    nothing reaches the network unless the user runs `sortedchat pull`."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ["HF_HUB_OFFLINE"] = "1"  # whatever the shell says: `pull` alone turns it off, for its download
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_quiet_libraries()


def _bounded_thread_waits() -> None:
    """torch's OpenMP threads wait for each other between operators. By default they spin for long, and on a
    machine whose cores are busy with other work a spinning thread holds the core its partner needs: 2 threads
    beside 2 busy processes ran 0.9 tok/s against 4.7 with 1 thread. Sleeping at once (passive) avoids that but
    costs a quiet machine 40% (12.9 against 21.4 tok/s); spinning 30000 rounds, then sleeping, kept 18.9 quiet and
    3.3 busy (BENCHMARKS.md, "Threads under load"). Read when torch is first imported, which the commands do after
    this; a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins."""
    import os

    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "30000")


_bounded_thread_waits()

# Modules that define `register(app)`; each adds its own commands.
COMMAND_MODULES = ["sortedchat.cli.chat", "sortedchat.cli.ask", "sortedchat.cli.info", "sortedchat.cli.pull",
                   "sortedchat.cli.train", "sortedchat.cli.eval", "sortedchat.cli.bench", "sortedchat.cli.calibrate",
                   "sortedchat.cli.serve"]

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    import warnings

    from sortedchat import SortedChatError
    from sortedchat.cli.debug import report

    if not sys.warnoptions:  # library warnings are for developers (PYTHONWARNINGS=default shows them)
        warnings.simplefilter("ignore")
    try:
        app()
    except SortedChatError as exc:
        report(exc)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
