"""`sortedchat bench`: every decoding mode against transformers' `generate`, in one process.

`runner` holds the protocol (see its docstring), `costs` the per-layer / head / check costs behind the
ideal ratios, `report` the table, JSON and plot, `prompts` the default prompt set and prompt files.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from sortedchat.bench.costs import measure_costs
from sortedchat.bench.peer import skip_reason
from sortedchat.bench.runner import CLOCKS, PROTOCOL, Bench, Row
from sortedchat.quantize import describe as describe_quantization
from sortedchat.quantize import kind as quantization_kind
from sortedchat.sorted_model import SortedModel


def machine() -> dict:
    """What the numbers were measured on, including how busy the machine was."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0], "torch": torch.__version__}
    import transformers

    info["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_bench(
    sm: SortedModel,
    conversations: list[list[dict]],
    max_new_tokens: int,
    repeat: int,
    clock: str = "wall",
    progress: Callable[[str], None] = lambda msg: None,
    modes: list[str] | None = None,
    peer_gguf: Path | None = None,
) -> tuple[dict, list[Row]]:
    """Measure the costs, warm up, run the repeats; return (metadata, one row per mode). With `peer_gguf` and
    llama-cpp-python installed, llama.cpp runs that file as one more row (`peer`); the metadata says why not
    otherwise."""
    load_before = load_average()
    bench = Bench(sm, conversations, max_new_tokens, modes)
    skipped = skip_reason(peer_gguf)
    if skipped is None:
        bench.add_peer(peer_gguf, torch.get_num_threads())
    progress("measuring layer and head costs")
    context = sum(map(len, bench.prompts)) // len(bench.prompts) + max_new_tokens // 2
    costs = measure_costs(sm, context=context, clock=CLOCKS[clock])
    bench.warm_up(progress)
    bench.run(repeat, progress)
    bench.teacher_forced(progress)
    meta = {
        "model": sm.source,
        "weights": sm.weights_path,
        "layers": sm.num_layers,
        "exits": sm.exits,
        "thresholds": {str(k): v for k, v in sm.thresholds().items()},
        "confidence": sm.config.confidence,
        "device": str(sm.device),
        "dtype": str(sm.dtype).replace("torch.", ""),
        "quantization": quantization_kind(sm),
        "quantized": describe_quantization(sm),
        "max_new_tokens": max_new_tokens,
        "repeat": repeat,
        "clock": clock,
        "prompts": len(conversations),
        "prompt_tokens": [len(p) for p in bench.prompts],
        "machine": machine(),
        "load_average": {"before": load_before, "after": load_average()},
        "costs": costs.to_dict(),
        "peer": {"gguf": str(peer_gguf) if peer_gguf else None, "threads": torch.get_num_threads(), "skipped": skipped,
                 "prompt_batch": bench.peer.batch if bench.peer else None},
        "protocol": PROTOCOL,
    }
    return meta, bench.rows(costs, clock)
