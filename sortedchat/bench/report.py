"""How a benchmark is shown: a rich table on the terminal, a JSON file, and a speed-vs-agreement plot."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sortedchat.bench.runner import Row, RowKind
from sortedchat.config import atomic_write_text
from sortedchat.engine.modes import KV

AUTO_PROPAGATE = "auto:propagate"  # the plot's own style for auto mode with propagated K/V
KIND_STYLE = {  # kind -> (matplotlib colour, marker, legend)
    RowKind.HF: ("black", "s", "transformers generate (baseline)"),
    RowKind.HF_EE: ("tab:gray", "^", "transformers assistant_early_exit=k"),
    RowKind.FULL: ("tab:blue", "D", "sortedchat full depth"),
    RowKind.DEPTH: ("tab:blue", "o", "sortedchat fixed depth k"),
    RowKind.AUTO: ("tab:red", "*", "sortedchat auto (exact K/V)"),
    AUTO_PROPAGATE: ("tab:purple", "P", "sortedchat auto (propagated K/V)"),
    RowKind.SPEC: ("tab:green", "v", "sortedchat speculative, draft k (paced)"),
    RowKind.DRAFT: ("tab:olive", "<", "sortedchat speculative, draft k, always drafting"),
    RowKind.PEER: ("tab:brown", "X", "llama.cpp, same GGUF (its quantized weights)"),
}
PER_EXIT = (RowKind.DEPTH, RowKind.SPEC, RowKind.DRAFT, RowKind.HF_EE)  # one point per exit, joined and labelled


def _num(value, fmt: str, empty: str = "–") -> str:
    return empty if value is None else format(value, fmt)


def of_ideal_ratio(row: Row, rows: list[Row]) -> float | None:
    """A fixed depth's achieved speed-up over our full depth, as a share of the ideal one (`ideal_ratio`,
    from the measured layer and head costs: also relative to full depth, so overhead shared with full depth
    cancels)."""
    full = next((r for r in rows if r.kind == RowKind.FULL), None)
    if row.kind != RowKind.DEPTH or not row.ideal_ratio or full is None or not full.ratio:
        return None
    return row.ratio / full.ratio / row.ideal_ratio


def table(rows: list[Row], title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for name, justify in [
        ("mode", "left"), ("tok/s", "right"), ("× base", "right"), ("ideal × full", "right"), ("% of ideal", "right"),
        ("mean exit", "right"), ("accept", "right"), ("paced", "right"), ("agree", "right"), ("forced", "right"),
        ("checks", "right"),
        ("peak MiB", "right"),
    ]:
        t.add_column(name, justify=justify)
    for r in rows:
        of_ideal = of_ideal_ratio(r, rows)
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
            _num(r.paced_share, ".0%"),
            f"{r.agreement:.0%}",
            _num(r.forced_agreement, ".0%"),
            checks or "–",
            _num(r.peak_memory_mib, ".0f"),
        )
    return t


AGREEMENTS = {"agreement": "free-running", "forced_agreement": "teacher-forced"}


def fixed_depth_line(rows: list[Row], ratio: float, attr: str) -> float | None:
    """The agreement the fixed-depth modes reach at speed `ratio`: fixed depths and full depth joined by
    straight lines in order of speed (beyond either end, the end point's agreement)."""
    pts = sorted((r.ratio, getattr(r, attr)) for r in rows
                 if r.kind in (RowKind.FULL, RowKind.DEPTH) and getattr(r, attr) is not None)
    if not pts:
        return None
    if ratio <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if ratio <= x1:
            return y0 + (y1 - y0) * (ratio - x0) / (x1 - x0) if x1 > x0 else max(y0, y1)
    return pts[-1][1]


def auto_vs_fixed(rows: list[Row]) -> dict[str, dict[str, dict]]:
    """Does auto mode dominate fixed depth? Per auto row (by K/V way: "exact", "propagate") and agreement
    measure: auto's agreement against the fixed-depth line's at auto's speed (auto dominates when it is
    higher: better agreement at equal speed)."""
    out = {}
    for auto in (r for r in rows if r.kind == RowKind.AUTO):
        verdicts = {}
        for attr, name in AGREEMENTS.items():
            line = fixed_depth_line(rows, auto.ratio, attr)
            mine = getattr(auto, attr)
            if line is not None and mine is not None:
                verdicts[name] = {"ratio": auto.ratio, "auto": mine, "fixed_depth_line": line, "dominates": mine > line}
        out[auto.kv or "exact"] = verdicts
    return out


def dominating(verdicts: dict[str, dict[str, dict]]) -> dict[str, list[str]]:
    """Per agreement measure, the K/V ways whose auto mode dominates the fixed-depth line."""
    names = {name for by_name in verdicts.values() for name in by_name}
    return {name: [kv for kv, by_name in verdicts.items() if by_name.get(name, {}).get("dominates")]
            for name in AGREEMENTS.values() if name in names}


def verdict_line(name: str, ways: list[str], compared: list[str]) -> str:
    """"teacher-forced agreement: propagate auto dominates the fixed-depth line, exact auto does not"."""
    losers = [kv for kv in compared if kv not in ways]
    parts = []
    if ways:
        parts.append(f"{' and '.join(ways)} auto {'dominates' if len(ways) == 1 else 'dominate'} the fixed-depth line")
    if losers:
        parts.append(f"{' and '.join(losers)} auto {'does' if len(losers) == 1 else 'do'} not"
                     + ("" if ways else " dominate the fixed-depth line"))
    return f"verdict, {name} agreement: " + ", ".join(parts)


def print_table(rows: list[Row], title: str, console: Console | None = None) -> None:
    """On a terminal at its width; piped into a file, wide enough that no column is cut. Below the
    table, auto mode against the fixed-depth line."""
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 140)
    console.print(table(rows, title))
    verdicts = auto_vs_fixed(rows)
    for kv, by_name in verdicts.items():
        for name, v in by_name.items():
            verdict = "dominates fixed depth" if v["dominates"] else "does not dominate fixed depth"
            console.print(f"auto ({kv} K/V) at {v['ratio']:.2f}x: {name} agreement {v['auto']:.0%}; the fixed-depth "
                          f"line at that speed: {v['fixed_depth_line']:.0%} → auto {verdict}")
    for name, ways in dominating(verdicts).items():
        console.print(verdict_line(name, ways, list(verdicts)))
    versus = full_vs_peer(rows)
    if versus is not None:
        line = (f"our full depth {versus['full']:.1f} tok/s against llama.cpp's {versus['peer']:.1f} tok/s on the same "
                f"GGUF and threads: {versus['ratio']:.2f}x")
        if versus["decode_ratio"] is not None:
            line += (f"; decoding alone (prompt and first token left out) {versus['decode_full']:.1f} against "
                     f"{versus['decode_peer']:.1f} tok/s: {versus['decode_ratio']:.2f}x")
        console.print(line)


def full_vs_peer(rows: list[Row]) -> dict | None:
    """Our full depth's tokens/s against llama.cpp's (the peer row), by the table's clock, and decoding alone (wall
    clock; None where either could not tell); None without a peer. Decoding alone tells the engines apart where
    their prompts are not alike: a llama.cpp whose batched prompts crash takes them a token at a time."""
    full = next((r for r in rows if r.kind == RowKind.FULL), None)
    peer = next((r for r in rows if r.kind == RowKind.PEER), None)
    if full is None or peer is None or not peer.tokens_per_second:
        return None
    decode_full, decode_peer = full.decode_tokens_per_second, peer.decode_tokens_per_second
    return {"full": full.tokens_per_second, "peer": peer.tokens_per_second,
            "ratio": full.tokens_per_second / peer.tokens_per_second,
            "decode_full": decode_full, "decode_peer": decode_peer,
            "decode_ratio": decode_full / decode_peer if decode_full and decode_peer else None}


def write_json(path: str | Path, meta: dict, rows: list[Row]) -> Path:
    data = dict(meta, rows=[dict(r.to_dict(), of_ideal=of_ideal_ratio(r, rows)) for r in rows],
                auto_vs_fixed=auto_vs_fixed(rows), auto_dominating=dominating(auto_vs_fixed(rows)),
                full_vs_peer=full_vs_peer(rows))
    return atomic_write_text(Path(path), json.dumps(data, indent=2) + "\n")


def write_plot(path: str | Path, rows: list[Row], title: str) -> Path:
    """Speed ratio against agreement with full-depth greedy, one point per mode, exits labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    def style(r: Row) -> str:
        return AUTO_PROPAGATE if r.kind == RowKind.AUTO and r.kv == KV.PROPAGATE else r.kind

    for ax, (attr, name) in zip(axes, AGREEMENTS.items()):
        for kind, (colour, marker, legend) in KIND_STYLE.items():
            pts = [r for r in rows if style(r) == kind and getattr(r, attr) is not None]
            if not pts:
                continue
            if kind in PER_EXIT:
                ordered = sorted(pts, key=lambda r: r.exit)
                ax.plot([getattr(r, attr) for r in ordered], [r.ratio for r in ordered], color=colour, alpha=0.35, lw=1)
            ax.scatter([getattr(r, attr) for r in pts], [r.ratio for r in pts], c=colour, marker=marker,
                       s=140 if kind in (RowKind.AUTO, AUTO_PROPAGATE) else 45, label=legend, zorder=3)
            if kind in PER_EXIT:
                for r in pts:
                    ax.annotate(str(r.exit), (getattr(r, attr), r.ratio), textcoords="offset points", xytext=(4, 4),
                                fontsize=7, color=colour)
        ax.axhline(1.0, color="black", lw=0.6, ls="--")
        ax.set_xlabel(f"{name} agreement with full-depth greedy (share of identical tokens)")
        ax.set_xlim(-0.03, 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speed ratio to transformers generate")
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(textwrap.fill(title, 160), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
