"""Model FLOPs utilisation of training runs: achieved model FLOPs per second over the GPU's peak.

Model FLOPs per trained token follow the usual count (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022):
`k * N + a * L * H * S`, where N is the parameters the matrix products use (the decoder layers and the LM
head; the embedding lookup is no product), the second term the attention scores and mixing at sequence
length S, and by what is trained: `full` k = 6 (forward 2, input gradients 2, weight gradients 2), a = 12;
`lora` k = 4 (the frozen weights get no weight gradient; the adapters' own products are under 1% here and
not counted), a = 12; `frozen` (lenses on a frozen model: no gradient flows through it) k = 2, a = 4.
SoFT's extra exit heads count as no model FLOPs: the figure measures the useful work of the one model, so
a slower SoFT step shows as a lower MFU than SFT's.

Inputs: `--train-cost FILE`, the table `benchmarks/train_cost.py` prints (its `method` and `tok/s` columns;
rows of `--trained`, but `lens...` rows count as `frozen`),
and/or `--metrics FILE`, a training run's metrics.jsonl (its `tokens_per_second` lines).

    python benchmarks/gpu/mfu.py --config DIR --trained lora --seq 256 --train-cost train-cost.txt --json mfu.json
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Annotated, Optional

import typer

H200_BF16_DENSE = 989.4e12  # FLOP/s: NVIDIA's H200 SXM bf16 tensor-core peak without sparsity


TRAINED = {"full": (6, 12), "lora": (4, 12), "frozen": (2, 4)}


def flops_per_token(config: dict, trained: str, seq: int) -> float:
    H, L, V = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or H // heads
    attention = H * heads * head_dim * 2 + H * kv * head_dim * 2  # q, o; k, v
    mlp = 3 * H * config["intermediate_size"]
    n = L * (attention + mlp) + V * H
    k, a = TRAINED[trained]
    return k * n + a * L * H * seq


def train_cost_rates(text: str) -> dict[str, float]:
    """method -> tokens/s from train_cost.py's table (box-drawn rows; the header names the columns)."""
    rows = [[c.strip() for c in line.strip().strip("┃│").split("┃" if "┃" in line else "│")]
            for line in text.splitlines() if line.strip().startswith(("┃", "│"))]
    header = next((r for r in rows if "method" in r and "tok/s" in r), None)
    if header is None:
        raise typer.BadParameter("no table with 'method' and 'tok/s' columns (was it printed narrower than "
                                 "its columns? set COLUMNS=200)", param_hint="--train-cost")
    m, t = header.index("method"), header.index("tok/s")
    return {r[m]: float(r[t].replace(",", "")) for r in rows if r is not header and len(r) == len(header) and r[m]}


def main(
    config: Annotated[Path, typer.Option("--config", help="The model's config.json, or its directory")],
    trained: Annotated[str, typer.Option("--trained", help="train_cost's rows: full, lora or frozen")] = "lora",
    metrics_trained: Annotated[Optional[str], typer.Option("--metrics-trained", help="... the training run's "
                                                           "[default: --trained]")] = None,
    seq: Annotated[int, typer.Option("--seq", help="Sequence length of train_cost's rows")] = 256,
    metrics_seq: Annotated[Optional[int], typer.Option("--metrics-seq", help="... of the training run's "
                                                       "[default: --seq]")] = None,
    peak: Annotated[float, typer.Option("--peak", help="The GPU's peak FLOP/s in the training "
                                        "dtype")] = H200_BF16_DENSE,
    train_cost: Annotated[Optional[Path], typer.Option("--train-cost")] = None,
    metrics: Annotated[Optional[Path], typer.Option("--metrics")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json")] = None,
) -> None:
    path = config / "config.json" if config.is_dir() else config
    cfg = json.loads(path.read_text())
    runs = {}  # name -> (tokens/s, model FLOPs per token)
    if train_cost is not None:
        for name, rate in train_cost_rates(train_cost.read_text()).items():  # a `lens` row trains lenses only
            how = "frozen" if name.startswith("lens") else trained
            runs[f"train_cost {name}"] = (rate, flops_per_token(cfg, how, seq))
    if metrics is not None:
        logged = [json.loads(x) for x in metrics.read_text().splitlines() if '"tokens_per_second"' in x]
        if logged:
            rate = statistics.median(x["tokens_per_second"] for x in logged)
            runs["training run (median of logged windows)"] = (
                rate, flops_per_token(cfg, metrics_trained or trained, metrics_seq or seq))
    result = {"peak_flops": peak, "trained": trained, "metrics_trained": metrics_trained or trained,
              "runs": {k: {"tokens_per_second": v, "flops_per_token": f, "mfu": v * f / peak}
                       for k, (v, f) in runs.items()}}
    for name, r in result["runs"].items():
        print(f"{name}: {r['tokens_per_second']:,.0f} tok/s · MFU {r['mfu']:.2%}")
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    typer.run(main)
