"""Training curves from `metrics.jsonl`: held-out agreement with full depth per exit, against tokens seen.

Every `--eval-interval` steps a run logs each exit's held-out CE and top-1 agreement with the full depth;
this draws them (one panel per run, one line per exit) so a model card can show where returns flatten, and
prints the same figures as a Markdown table. With `--exits`, one panel per named exit and one line per run
instead, so tries trained at the same budget compare on one figure. `A+B` draws run B as the continuation of
run A (B started from A's weights, e.g. `--init-lenses A`): one line, B's steps and tokens counted after A's.

    python -m sortedchat.training.curves runs/a runs/b --label "SoFT + lens" --label "lens only" --png curves.png
    python -m sortedchat.training.curves runs/a runs/b --exits 21,24,27 --png tries.png
    python -m sortedchat.training.curves runs/lens+runs/soft-lens --label "lenses, then SoFT + lenses" --png c.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_evals(run: Path) -> list[dict]:
    """[(step, tokens, {exit: {"ce", "agree"}})] of one run, in step order (training lines give the tokens)."""
    tokens, out = {}, []
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        row = json.loads(line)
        if "tokens" in row:
            tokens[row["step"]] = row["tokens"]
        if "eval" in row:
            seen = max((t for s, t in tokens.items() if s <= row["step"]), default=0)
            out.append({"step": row["step"], "tokens": seen, "eval": {int(e): v for e, v in row["eval"].items()}})
    return out


def read_chain(spec: str) -> list[dict]:
    """`A+B+...`: each run's evals after the previous run's, its steps and tokens counted from where that one ended."""
    out: list[dict] = []
    for part in [spec] if Path(spec).is_dir() else spec.split("+"):  # a directory may have "+" in its name
        step0, tokens0 = (out[-1]["step"], out[-1]["tokens"]) if out else (0, 0)
        evals = [r | {"step": r["step"] + step0, "tokens": r["tokens"] + tokens0} for r in read_evals(Path(part))]
        if out and evals:
            evals[0]["continues_at"] = tokens0  # where the plot marks the start of a continuing run
        out += evals
    return out


def table(label: str, evals: list[dict]) -> str:
    exits = sorted(evals[-1]["eval"]) if evals else []
    head = f"| {label}: step | tokens | " + " | ".join(f"exit {e}" for e in exits) + " |"
    rule = "|---" * (len(exits) + 2) + "|"
    rows = [f"| {r['step']} | {r['tokens']:,} | "
            + " | ".join(f"{100 * r['eval'][e].get('agree', 0):.1f}%" for e in exits) + " |" for r in evals]
    return "\n".join([head, rule, *rows])


def plot(runs: dict[str, list[dict]], png: Path, exits: list[int] | None = None) -> None:
    """One panel per run with a line per exit; with `exits`, one panel per exit with a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def line(ax, evals: list[dict], e: int, label: str) -> None:
        rows = [r for r in evals if e in r["eval"]]
        ax.plot([r["tokens"] / 1e3 for r in rows], [100 * r["eval"][e].get("agree", 0) for r in rows],
                marker="o", label=label)
        for r in rows:
            if "continues_at" in r:
                ax.axvline(r["continues_at"] / 1e3, color="grey", linestyle=":", linewidth=1)

    if exits:
        panels = [(f"exit {e}", [(evals, e, label) for label, evals in runs.items()]) for e in exits]
    else:
        panels = [(label, [(evals, e, f"exit {e}") for e in (sorted(evals[-1]["eval"])[:-1] if evals else [])])
                  for label, evals in runs.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False, sharey=True)
    for ax, (title, lines) in zip(axes[0], panels):
        for args in lines:
            line(ax, *args)
        ax.set_title(title)
        ax.set_xlabel("training tokens (thousands)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out top-1 agreement with full depth (%)")
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the lines, never on them
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110, bbox_inches="tight")


def exit_list(text: str) -> list[int]:
    """`--exits 21,24,27` as layer numbers; anything else stops with a one-line error."""
    try:
        return [int(e) for e in text.split(",")]
    except ValueError:
        raise SystemExit(f"--exits: expected layer numbers like 21,24,27, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl); A+B: B continues A")
    ap.add_argument("--label", action="append", help="one per run (default: the directory name)")
    ap.add_argument("--png", type=Path, help="write the plot here")
    ap.add_argument("--exits", help="plot one panel per exit (e.g. 21,24,27) with one line per run")
    args = ap.parse_args(argv)
    labels = args.label or [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"--label: {len(labels)} labels for {len(args.runs)} runs")
    runs = {label: read_chain(run) for label, run in zip(labels, args.runs)}
    for label, evals in runs.items():
        print(table(label, evals) + "\n")
    if args.png:
        plot(runs, args.png, exit_list(args.exits) if args.exits else None)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
