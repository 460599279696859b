"""How a benchmark is shown: a rich table on the terminal, a JSON file, and a speed-vs-agreement plot."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sortedchat.bench.runner import Row
from sortedchat.config import atomic_write_text

KIND_STYLE = {  # kind -> (matplotlib colour, marker, legend)
    "hf": ("black", "s", "transformers generate (baseline)"),
    "hf-ee": ("tab:gray", "^", "transformers assistant_early_exit=k"),
    "full": ("tab:blue", "D", "sortedchat full depth"),
    "depth": ("tab:blue", "o", "sortedchat fixed depth k"),
    "auto": ("tab:red", "*", "sortedchat auto"),
    "spec": ("tab:green", "v", "sortedchat speculative, draft k"),
}


def _num(value, fmt: str, empty: str = "–") -> str:
    return empty if value is None else format(value, fmt)


def table(rows: list[Row], title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for name, justify in [
        ("mode", "left"), ("tok/s", "right"), ("× base", "right"), ("ideal ×", "right"), ("% of ideal", "right"),
        ("mean exit", "right"), ("accept", "right"), ("agree", "right"), ("checks", "right"), ("peak MiB", "right"),
    ]:
        t.add_column(name, justify=justify)
    for r in rows:
        of_ideal = r.ratio / r.ideal_ratio if r.ideal_ratio and r.kind in ("full", "depth") else None
        checks = None
        if r.check_share is not None:
            checks = f"{r.check_share:.1%} ({r.checks_per_token:.1f}/tok)"
        t.add_row(
            r.label,
            f"{r.tokens_per_second:.1f}",
            f"{r.ratio:.2f}",
            _num(r.ideal_ratio, ".2f"),
            _num(of_ideal, ".0%"),
            _num(r.mean_exit, ".1f"),
            _num(r.acceptance, ".0%"),
            f"{r.agreement:.0%}",
            checks or "–",
            _num(r.peak_memory_mib, ".0f"),
        )
    return t


def print_table(rows: list[Row], title: str, console: Console | None = None) -> None:
    """On a terminal at its width; piped into a file, wide enough that no column is cut."""
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 130)
    console.print(table(rows, title))


def write_json(path: str | Path, meta: dict, rows: list[Row]) -> Path:
    data = dict(meta, rows=[r.to_dict() for r in rows])
    return atomic_write_text(Path(path), json.dumps(data, indent=2) + "\n")


def write_plot(path: str | Path, rows: list[Row], title: str) -> Path:
    """Speed ratio against agreement with full-depth greedy, one point per mode, exits labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for kind, (colour, marker, legend) in KIND_STYLE.items():
        pts = [r for r in rows if r.kind == kind]
        if not pts:
            continue
        if kind in ("depth", "spec", "hf-ee"):
            ordered = sorted(pts, key=lambda r: r.exit)
            ax.plot([r.agreement for r in ordered], [r.ratio for r in ordered], color=colour, alpha=0.35, lw=1)
        ax.scatter([r.agreement for r in pts], [r.ratio for r in pts], c=colour, marker=marker,
                   s=140 if kind == "auto" else 45, label=legend, zorder=3)
        if kind in ("depth", "spec", "hf-ee"):
            for r in pts:
                ax.annotate(str(r.exit), (r.agreement, r.ratio), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=colour)
    ax.axhline(1.0, color="black", lw=0.6, ls="--")
    ax.set_xlabel("agreement with full-depth greedy (share of identical tokens)")
    ax.set_ylabel("speed ratio to transformers generate")
    ax.set_xlim(-0.03, 1.05)
    ax.set_title(textwrap.fill(title, 110), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
