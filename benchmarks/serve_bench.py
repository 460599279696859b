"""`sortedchat serve` against the engine driven directly, in one process, on one loaded model.

The server is the real one (uvicorn on a thread of this process, a free port of 127.0.0.1), reached with the
official `openai` client, streamed; the baseline is what `sortedchat ask` runs: a fresh `ChatSession` streaming
its events on the main thread. Every answer runs to exactly `-n` tokens (`ignore_eos`), greedy.

1. One streamed full-depth answer: tokens/s through the server / tokens/s direct (decode: first token to last,
   as the client sees it). Rounds alternate, medians. The direct loop also runs on a worker thread, as the
   server's engine does (on a busy machine torch's threads make the main thread's loop slower).
2. Four concurrent streams (four prompts at four modes; all at full depth; all in auto mode): their total
   tokens/s / one stream's (the same prompts one at a time, through the server, in the same round); each
   concurrent answer must equal its own single run.
3. Time to first token of a ~100-token prompt while three other streams run / the same when the server is idle.
4. What one batched round costs, by CPU time on one torch thread (it holds on a busy machine, where wall clocks
   do not): the layers of 4 full-depth steps run together (`run_together`) / one by one; 4 greedy heads one row
   at a time (the half-precision screen) / one float32 product over the 4 rows.

The machine may be shared: the load average is printed before and after.

    python benchmarks/serve_bench.py                 # default model, 96 tokens, 3 rounds
    python benchmarks/serve_bench.py -n 64 --rounds 2 --model path/to/checkpoint
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Optional

import openai
import torch
import typer

from sortedchat.cli.serve import build_app
from sortedchat.engine import ChatSession, Mode, SamplingConfig
from sortedchat.engine.context import encode_chat
from sortedchat.loading import LoadOptions, load_sorted_model
from sortedchat.server.batching import LayersAsk, run_together
from sortedchat.server.running import in_background

PROMPTS = ["Explain how a bicycle stays upright.", "Write a short poem about the sea.",
           "List five uses of a paper clip.", "What makes bread rise?"]
LONG_PROMPT_TOKENS = 100
FILLER = ("Summarise the following notes in two sentences. The committee met on Monday to discuss the budget for "
          "the new library wing, the schedule of the building works, the choice of furniture, the opening hours "
          "during the holidays, the hiring of two more librarians and a plan to lend laptops to students who need "
          "them for their studies at home, as well as the reading club and the children's corner. ") * 4


def messages(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def long_prompt(sm) -> str:
    """The filler cut to the longest prefix whose chat prompt is at most LONG_PROMPT_TOKENS tokens."""
    words = FILLER.split()
    while len(encode_chat(sm, messages(" ".join(words)))) > LONG_PROMPT_TOKENS:
        words.pop()
    return " ".join(words)


class Stream:
    """One streamed answer through the server: its text, exit layers and clocks (request, first and last token)."""

    def __init__(self, url: str, prompt: str, tokens: int, fields: dict):
        self.text, self.exits = "", []
        self.start = time.perf_counter()
        self.first = self.last = None
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        for chunk in api.chat.completions.create(model="bench", messages=messages(prompt), max_tokens=tokens,
                                                 stream=True, extra_body={"ignore_eos": True, **fields}):
            for choice in chunk.choices:
                if "exit_layer" in (choice.model_extra or {}):
                    self.last = time.perf_counter()
                    self.first = self.first or self.last
                    self.text += choice.delta.content or ""
                    self.exits.append(choice.model_extra["exit_layer"])

    @property
    def decode_rate(self) -> float:
        return (len(self.exits) - 1) / (self.last - self.first)

    @property
    def ttft(self) -> float:
        return self.first - self.start


def direct_rate(sm, prompt: str, tokens: int) -> float:
    """`sortedchat ask`'s loop: a fresh session streaming on this thread; decode tokens/s, first token to last."""
    stamps = [time.perf_counter() for _ in ChatSession(sm, Mode.fixed()).generate(
        messages(prompt), SamplingConfig(max_new_tokens=tokens, stop_at_end_of_turn=False))]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def concurrent(url: str, n: int, rounds: int, modes: list[dict]) -> tuple[float, float, float, bool]:
    """(median of each round's ratio, total tokens/s of the four prompts streamed at once, tokens/s of each
    alone, whether every concurrent answer equals its single run: text and exit layers; speculative ones by text
    and count, since the pacer's clock decides which tokens are drafted). Each round streams the prompts alone,
    then together, so that a shared machine's load changes between rounds, not within one."""
    def same(x: Stream, y: Stream, fields: dict) -> bool:
        exact = fields["mode"] != "speculative"
        return x.text == y.text and (x.exits == y.exits if exact else len(x.exits) == len(y.exits))

    ratios, totals, ones, identical = [], [], [], True
    for _ in range(rounds):
        singles = [Stream(url, p, n, f) for p, f in zip(PROMPTS, modes)]
        ones.append(statistics.median(len(x.exits) / (x.last - x.start) for x in singles))
        start = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda pf: Stream(url, pf[0], n, pf[1]), zip(PROMPTS, modes)))
        totals.append(sum(len(x.exits) for x in together) / (max(x.last for x in together) - start))
        ratios.append(totals[-1] / ones[-1])
        identical &= all(same(x, y, f) for x, y, f in zip(together, singles, modes))
    return statistics.median(ratios), statistics.median(totals), statistics.median(ones), identical


def decoding(scheduler, count: int, polls: int = 60_000) -> None:
    """Wait until `count` answers have read their prompts and are decoding."""
    for _ in range(polls):
        active = list(scheduler.active)
        if len(active) >= count and all(job.stats is not None for job in active):
            return
        time.sleep(0.01)
    raise SystemExit(f"the {count} background answers never started")


def cpu_ms(work, repeats: int = 9) -> float:
    """Median CPU time of `work()` on this thread, in ms."""
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        work()
        times.append(time.thread_time() - start)
    return statistics.median(times) * 1000


def round_costs(sm) -> tuple[float, float, float, float]:
    """(layers of 4 full-depth steps together, one by one, 4 greedy head rows one at a time, in one product), CPU
    ms on one torch thread, on a worker thread; the 4 sessions hold the 4 prompts and a few answer tokens."""
    sessions = []
    for prompt in PROMPTS:
        session = ChatSession(sm, Mode.fixed())
        list(session.generate(messages(prompt), SamplingConfig(max_new_tokens=4, stop_at_end_of_turn=False)))
        sessions.append(session)
    L, token, out = sm.num_layers, sessions[0].state.tokens[-1], []

    def back():  # forget the token the measure fed
        for session in sessions:
            session.state.crop(session.state.length - 1)

    def together():
        run_together([LayersAsk(session.state, L, [token]) for session in sessions])
        back()

    def one_by_one():
        for session in sessions:
            session.state.run(L, [token])
        back()

    def measure():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                hidden = sessions[0].state.run(L, [token])[:, -1]
                back()
                rows = hidden.expand(len(sessions), -1).contiguous()
                for work in (together, one_by_one):
                    work()  # warm-up
                out.extend([cpu_ms(together), cpu_ms(one_by_one),
                            cpu_ms(lambda: [sm.head(hidden, L, True) for _ in sessions]),
                            cpu_ms(lambda: sm.head(rows, L))])
        finally:
            torch.set_num_threads(threads)

    worker = threading.Thread(target=measure)
    worker.start()
    worker.join()
    return tuple(out)


def main(
    model: Annotated[Optional[str], typer.Option(help="--model as for sortedchat (default: built-in)")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 96,
    rounds: Annotated[int, typer.Option(help="Rounds of each measure (medians)")] = 3,
    device: Annotated[str, typer.Option()] = "cpu",
) -> None:
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    sm = load_sorted_model(model, LoadOptions(device=device))
    n, L = max_new_tokens, sm.num_layers
    modes = [{"mode": "full"}, {"mode": "depth", "depth": sm.exits[len(sm.exits) // 2]}, {"mode": "auto"},
             {"mode": "speculative", "depth": sm.default_draft_exit}]
    app = build_app(sm, "bench", Mode.fixed(), SamplingConfig(), None, slots=4, queue=4)
    scheduler = app.state.scheduler
    with in_background(app) as url:
        Stream(url, PROMPTS[0], 8, {})  # warm-up: the first request pays one-time costs
        direct_rate(sm, PROMPTS[0], 8)

        served, direct, worker = [], [], []
        with ThreadPoolExecutor(1) as thread:
            for _ in range(rounds):
                served.append(Stream(url, PROMPTS[0], n, {"mode": "full"}).decode_rate)
                direct.append(direct_rate(sm, PROMPTS[0], n))
                worker.append(thread.submit(direct_rate, sm, PROMPTS[0], n).result())
        s, d, w = statistics.median(served), statistics.median(direct), statistics.median(worker)
        print(f"1. full depth, streamed, {n} tokens: server {s:.1f} tok/s, direct {d:.1f} tok/s (as `ask`: main "
              f"thread), ratio {s / d:.3f} (target >= 0.95); direct on a worker thread (the server's engine runs on "
              f"one) {w:.1f} tok/s, ratio {s / w:.3f}")

        for label, chosen in (("4 modes: " + ", ".join(f["mode"] for f in modes), modes),
                              ("all full depth", [{"mode": "full"}] * 4), ("all auto", [{"mode": "auto"}] * 4)):
            ratio, total, one, identical = concurrent(url, n, rounds, chosen)
            print(f"2. 4 concurrent streams ({label}), {n} tokens each: total {total:.1f} tok/s, one stream "
                  f"{one:.1f} tok/s (request to last token), ratio {ratio:.2f} (median of the rounds' ratios; "
                  f"target >= 2.5); each answer identical to its single run: {identical}")

        prompt = long_prompt(sm)
        size = len(encode_chat(sm, messages(prompt)))
        idle, loaded = [], []
        for r in range(rounds):
            # Each prompt starts differently, so none reuses another's K/V beyond the chat template's start.
            idle.append(Stream(url, f"(idle {r}) {prompt}", 1, {"mode": "full"}).ttft)
            with ThreadPoolExecutor(3) as pool:
                others = [pool.submit(Stream, url, PROMPTS[i], 4 * n, {"mode": "full"}) for i in range(3)]
                decoding(scheduler, 3)
                loaded.append(Stream(url, f"(busy {r}) {prompt}", 1, {"mode": "full"}).ttft)
                for job in list(scheduler.active):
                    scheduler.cancel(job)
                for other in others:
                    other.result()
        i, b = statistics.median(idle), statistics.median(loaded)
        print(f"3. time to first token, {size}-token prompt: idle {i * 1000:.0f} ms, with 3 streams running "
              f"{b * 1000:.0f} ms, ratio {b / i:.2f} (target <= 2)")
    together, alone, heads, head_product = round_costs(sm)
    print(f"4. one round of 4 full-depth steps, CPU ms on 1 thread: layers together {together:.1f}, one by one "
          f"{alone:.1f} ({alone / together:.2f}x); heads one row at a time {heads:.1f}, one product over the 4 rows "
          f"{head_product:.1f}")
    print(f"model: {sm.source} ({L} layers); load average after: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    typer.run(main)
