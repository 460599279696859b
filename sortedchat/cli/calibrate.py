"""`sortedchat calibrate`: per-exit auto thresholds for a target agreement, written into sortedchat.json."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from sortedchat.cli import options as o
from sortedchat.cli.option_groups import takes_groups
from sortedchat.cli.prechecks import check_before_loading
from sortedchat.engine.modes import KV, kv_way


def register(app: typer.Typer) -> None:
    app.command()(calibrate)


@takes_groups
def calibrate(
    *,
    data: Annotated[str, typer.Option("--data", help="Held-out reference answers: Alpaca/chat/QA JSON or JSONL, or "
                                      "plain text (.txt)")],
    model: o.ModelOpt = None,
    target_agreement: Annotated[float, typer.Option("--target-agreement", help="Share of tokens auto mode must pick "
                                                    "as the full model does (teacher-forced)")] = 0.95,
    measure: Annotated[Optional[str], typer.Option("--measure", help="A confidence measure of auto mode (a wrong "
                                                   "name lists them all) [default: every one; the fastest at the "
                                                   "target is written]")] = None,
    kv: Annotated[str, typer.Option("--kv", help="Calibrate auto mode with exact K/V, or with propagated K/V "
                                    "(agreement measured under propagation, token by token: slower)")] = "exact",
    holdout: o.HoldoutOpt = 0,
    limit: o.LimitOpt = 300,
    load: o.PreciseLoadFlags,
) -> None:
    """Choose per-exit auto thresholds (and train the exit classifier) for a target agreement; write them
    into the model's sortedchat.json."""
    from sortedchat import calibrate as cal

    cal.check_options(target_agreement, measure, limit, kv)
    check_before_loading(model, load)
    sm = o.load_model(model, load.load_options())
    cal.checkpoint_dir(sm)  # fail before the long part
    with Console(stderr=True).status("calibrating", spinner="dots") as status:
        result = cal.calibrate(sm, data, target_agreement, measure, limit, holdout,
                               progress=lambda stage, frac=None: status.update(stage), kv=kv)
    print_result(sm, result, target_agreement, kv)
    for path in cal.write_or_rescue(sm, result, target_agreement):
        Console().print(f"wrote {path}")


def print_result(sm, result, target_agreement: float, kv: str) -> None:
    """The costs measured, every measure's plan at the target, and the chosen plan's thresholds."""
    console = Console()
    costs = result.costs
    console.print(f"[dim]{sm.source} · {result.positions['report']} held-out answer tokens · one layer "
                  f"{costs.layer * 1e3:.2f} ms (one more position {costs.drain:.0%} of it, its propagated "
                  f"K/V {costs.kv_fill / max(costs.layer, 1e-12):.0%}), head "
                  f"{costs.head * 1e3:.2f} ms, full token "
                  f"{costs.token(sm.num_layers) * 1e3:.1f} ms (without overhead)[/dim]")
    how = ("teacher-forced" if kv_way(kv) is KV.EXACT
           else "teacher-forced with propagated K/V, agreement with the exact model")
    summary = Table(title=f"auto mode, {kv} K/V, at target agreement {target_agreement:.0%} (held-out, {how})",
                    title_justify="left")
    for col in ("measure", "check ms", "checks/token", "check cost", "mean exit", "agreement", "expected ×"):
        summary.add_column(col, justify="left" if col == "measure" else "right")
    for name, p in result.plans.items():
        mark = " ✓" if p is result.chosen else ""
        summary.add_row(f"{name}{mark}", f"{costs.check.get(name, 0) * 1e3:.3f}", f"{p.checks_per_token:.2f}",
                        f"{p.check_share:.1%}", f"{p.mean_exit:.1f}", f"{p.agreement:.1%}", f"{p.speedup:.2f}")
    console.print(summary)
    if result.start is not None:
        s = result.start
        console.print(f"[dim]started from the one-pass (exact K/V) plan of {s.measure}: agreement {s.agreement:.1%}, "
                      f"expected {s.speedup:.2f}× with propagation's costs[/dim]")
    per_exit = Table(title=f"thresholds ({result.chosen.measure})", title_justify="left")
    for col in ("exit", "threshold", "tokens leaving here", "their agreement"):
        per_exit.add_column(col, justify="right")
    for e, v in result.chosen.per_exit.items():
        tau = "not checked" if v["threshold"] >= 1.0 else f"{v['threshold']:.4f}"
        agree = "–" if v["agreement"] is None else f"{v['agreement']:.1%}"
        per_exit.add_row(str(e), tau, f"{v['share']:.1%}", agree)
    console.print(per_exit)
