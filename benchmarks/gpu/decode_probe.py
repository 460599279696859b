"""What bounds batch-1 decoding on this machine: the GPU's work, or launching it. Needs no weights.

Decoding speed does not depend on weight values, so this builds the model from a config with random weights
(by default SmolLM2-135M's, `smollm2-135m-config.json`) and measures, in one process, with the device
synchronized before every clock reading:

- ms per token of transformers' `generate` (eager, its dynamic cache) and of our engine's full depth and
  fixed depths (`LayeredState.run` + the exit head, as `ChatSession` does per token);
- the engine's costs as `sortedchat bench` prices them (`bench.costs`): a layer, the head, and `drain`, what
  one more position adds to a layer call (near 0 where batching is free);
- under torch.profiler, for 16 tokens of each: CUDA kernels launched per token, and the GPU's busy share
  (kernel time / wall time). A low share means the GPU waits for Python and launches: the case for CUDA
  graphs (benchmarks/gpu/README.md, "Batch-1 decoding on a GPU");
- with `--ceiling`: transformers' static cache with its automatic `torch.compile` (CUDA graphs on a GPU):
  the first call's seconds (compiling) and ms per token afterwards, the ceiling that graphs reach.

Every figure is written to `--json` as soon as it exists.

    python benchmarks/gpu/decode_probe.py --device cuda --dtype bfloat16 --json $OUT/decode-probe.json --ceiling
"""

from __future__ import annotations

import json
import statistics
import time
import traceback
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from sortedchat.bench.costs import device_sync, measure_costs
from sortedchat.config import SortedConfig
from sortedchat.engine.state import LayeredState
from sortedchat.sorted_model import SortedModel

HERE = Path(__file__).parent


class Report:
    """The results so far, rewritten to `path` after each addition."""

    def __init__(self, path: Path | None, **meta):
        self.path, self.data = path, dict(meta)

    def add(self, key: str, value) -> None:
        self.data[key] = value
        print(f"{key}: {json.dumps(value)}", flush=True)
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            tmp.replace(self.path)


def random_model(config_path: Path, device: str, dtype: torch.dtype) -> SortedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    return SortedModel(model, tokenizer=None, config=SortedConfig(), source=f"random weights, {config_path.name}")


def engine_tokens(sm: SortedModel, prompt: list[int], n: int, depth: int):
    """Return a function that decodes `n` tokens greedily at `depth` after a fresh prefill, as ChatSession does."""

    def run() -> list[int]:
        state = LayeredState(sm)
        state.run(sm.num_layers, prompt[:-1])
        token, out = prompt[-1], []
        for _ in range(n):
            hidden = state.run(depth, [token])[:, -1]
            token = int(sm.head(hidden, depth, greedy=True).argmax())
            out.append(token)
        return out

    return run


def hf_tokens(sm: SortedModel, prompt: list[int], n: int, **extra):
    ids = torch.tensor([prompt], device=sm.device)

    def run():
        return sm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, eos_token_id=None, pad_token_id=0, **extra)

    return run


def ms_per_token(fn, n: int, sync, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) / n * 1e3)
    return statistics.median(times)


def profile(fn, n: int, sync) -> dict:
    """Kernels launched and GPU busy share per token over one call of `fn` (n tokens)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sync()
    with torch_profile(activities=activities) as prof:
        t = time.perf_counter()
        fn()
        sync()
        wall_us = (time.perf_counter() - t) * 1e6
    device = [a for a in prof.key_averages() if a.device_type == DeviceType.CUDA]
    kernels = sum(a.count for a in device)
    busy_us = sum(a.self_device_time_total for a in device)
    return {"kernels_per_token": kernels / n, "gpu_us_per_token": busy_us / n, "wall_us_per_token": wall_us / n,
            "gpu_busy_share": busy_us / wall_us if device else None}


def main(
    device: Annotated[str, typer.Option("--device")] = "cuda",
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16")] = "bfloat16",
    config: Annotated[Path, typer.Option("--config", help="A model config.json, or a directory holding "
                                         "one")] = HERE / "smollm2-135m-config.json",
    tokens: Annotated[int, typer.Option("--tokens", help="Tokens decoded per timed call")] = 64,
    prompt_len: Annotated[int, typer.Option("--prompt-len")] = 64,
    rounds: Annotated[int, typer.Option("--rounds")] = 3,
    json_out: Annotated[Optional[Path], typer.Option("--json")] = None,
    ceiling: Annotated[bool, typer.Option("--ceiling", help="Also time transformers' static cache + "
                                          "torch.compile")] = False,
) -> None:
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    sm = random_model(config, device, torch_dtype)
    sync = device_sync(sm.device)
    import transformers

    report = Report(json_out, device=str(sm.device), dtype=dtype, model=sm.source, layers=sm.num_layers,
                    exits=sm.exits, tokens=tokens, prompt_len=prompt_len, torch=torch.__version__,
                    transformers=transformers.__version__,
                    gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, sm.model.config.vocab_size, (prompt_len,), generator=g).tolist()
    L, depths = sm.num_layers, [sm.exits[0], sm.exits[len(sm.exits) // 2]]
    runs = {"hf_generate": hf_tokens(sm, prompt, tokens), f"engine_depth_{L}": engine_tokens(sm, prompt, tokens, L)}
    runs |= {f"engine_depth_{k}": engine_tokens(sm, prompt, tokens, k) for k in depths}
    with torch.inference_mode():
        for fn in runs.values():
            fn()  # warm-up
        ms = {}
        for name, fn in runs.items():
            ms[name] = ms_per_token(fn, tokens, sync, rounds)
        report.add("ms_per_token", ms)
        report.add("engine_full_vs_generate", ms["hf_generate"] / ms[f"engine_depth_{L}"])
        costs = measure_costs(sm, context=prompt_len + tokens // 2, measures={}).to_dict()
        report.add("costs_ms", {k: (v * 1e3 if k in ("layer", "head", "step") else v)
                                for k, v in costs.items()
                                if k in ("layer", "head", "step", "drain", "context")})
        short = 16
        report.add("profile", {"hf_generate": profile(hf_tokens(sm, prompt, short), short, sync),
                               f"engine_depth_{L}": profile(engine_tokens(sm, prompt, short, L), short, sync)})
        if ceiling:
            try:
                static = hf_tokens(sm, prompt, tokens, cache_implementation="static")
                sync()
                t = time.perf_counter()
                static()
                sync()
                first = time.perf_counter() - t
                graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # 0: transformers did not compile
                report.add("static_cache_compiled", {"first_call_seconds": first, "compiled_graphs": graphs,
                                                     "ms_per_token": ms_per_token(static, tokens, sync, rounds)})
            except Exception as exc:  # a failed compile is a finding, not the end of the probe
                report.add("static_cache_compiled", {"error": traceback.format_exception_only(exc)[-1].strip()})


if __name__ == "__main__":
    typer.run(main)
