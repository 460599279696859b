"""`sortedchat calibrate`: per-exit thresholds (and the exit classifier) so that auto mode meets a target
agreement with the full model, written into the checkpoint's `sortedchat.json`.

Teacher-forced over reference answers: one forward pass with every hidden state gives every exit at every
position of an answer. For each checked exit (all but the last) we record whether its greedy token equals
the last exit's and what each confidence measure records. The examples are split three ways: fitting the
measures that learn (the exit classifier), threshold selection, and a held-out part on which the expected
agreement and speed-up are reported. Agreement here is per token given the same prefix; in free-running
generation one different token changes the rest of the answer, so `sortedchat bench` (position-wise
agreement) reports less.

Thresholds: every exit lets through the tokens it is most confident about as long as they agree with the
last exit at least a given share p of the time; p is the lowest value whose plan still meets the target
agreement overall (the last exit always agrees, so p is usually below the target). An exit whose early
tokens would save less time than checking costs is not checked at all (threshold 1). The expected
speed-up comes from the costs of a layer, the head and a check, timed here on the path the loaded model decodes on
(`bench.costs`: the session's own layer steps, the head's screen chosen on this machine); the record written
names the device, dtype and thread count they were measured at.

With propagated K/V (`--kv propagate`) the one-pass figures would be wrong: a token that leaves early changes
the K/V every later position sees. The cost model then counts no drain and the K/V projections of every skipped
layer, and agreement is measured under propagation, teacher-forced token by token through the engine's state
(`observe_propagated`): at each position every exit's prediction is recorded (the position runs through all
layers, seeing the K/V earlier positions left), then the position is made to hold what leaving at the exit the
thresholds pick would have stored (`LayeredState.refill`). Agreement there is with the exact full model's token.
Thresholds start from the one-pass plan, are chosen again on these observations (fit and select parts), and are
judged by a second propagated run over the report part with the final thresholds.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from sortedchat import SortedChatError
from sortedchat.bench.costs import Costs, measure_costs
from sortedchat.config import CONFIG_NAME, SortedConfig
from sortedchat.engine.confidence import MEASURES, Candidates, ExitView, Measure, previous_top
from sortedchat.engine.context import encode_chat
from sortedchat.engine.modes import KV, ModeError, kv_way
from sortedchat.engine.state import LayeredState
from sortedchat.outputs import check_output_dir
from sortedchat.outputs import write_or_rescue as rescued
from sortedchat.progress import Progress, quiet
from sortedchat.quantize import describe as describe_quantization
from sortedchat.sorted_model import SortedModel
from sortedchat.training.data import last_records, load_records

MAX_ANSWER_TOKENS = 256
SPLITS = ("fit", "select", "report")  # example i goes to SPLITS[SPLIT_OF[i % 4]]
SPLIT_OF = (0, 0, 1, 2)


# -- data ----------------------------------------------------------------------------------------------
def reference_sequences(
    sm: SortedModel, spec: str, max_examples: int, holdout: int = 0
) -> tuple[list[tuple[list[int], int]], dict]:
    """(token ids, index of the first answer position - 1) per example, and a description of the data.

    Plain text (`.txt`): every non-empty line is a document scored from its second token. Anything else is
    read by the training data reader (Alpaca, chat or QA records); the last assistant turn is the answer.
    `holdout` N keeps only the last N records (what `sortedchat train --holdout N` left out)."""
    path = Path(spec).expanduser()
    read = _documents if path.suffix.lower() == ".txt" else _answers
    out, described = read(sm, spec, max_examples, holdout)
    described["holdout"] = holdout
    if len(out) < len(SPLIT_OF):
        raise SortedChatError(f"--data {spec}: {len(out)} usable examples; calibration needs at least {len(SPLIT_OF)}")
    return out, described


def _documents(sm: SortedModel, spec: str, max_examples: int, holdout: int) -> tuple[list[tuple[list[int], int]], dict]:
    path = Path(spec).expanduser()
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").split("\n") if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise SortedChatError(f"--data {spec}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    out = []
    for line in last_records(lines, holdout, max_examples, spec):
        ids = sm.tokenizer(line, add_special_tokens=False)["input_ids"][: MAX_ANSWER_TOKENS + 1]
        if len(ids) >= 2:
            out.append((ids, 0))
    return out, {"path": str(path), "format": "text", "records": len(lines)}


def _answers(sm: SortedModel, spec: str, max_examples: int, holdout: int) -> tuple[list[tuple[list[int], int]], dict]:
    tok, out = sm.tokenizer, []
    records = load_records(spec, flag="--data")
    for ex in last_records(records.examples, holdout, max_examples, spec):
        messages = ex.chat_messages()
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt_ids = encode_chat(sm, messages[:last])
        answer = messages[last]["content"]
        if getattr(tok, "chat_template", None):  # the answer as the template writes it, end of turn included
            before = tok.apply_chat_template(messages[:last], add_generation_prompt=True, tokenize=False)
            full = tok.apply_chat_template(messages[: last + 1], tokenize=False)
            answer = full[len(before):] if full.startswith(before) else answer
        answer_ids = tok(answer, add_special_tokens=False)["input_ids"][: MAX_ANSWER_TOKENS + 1]
        if answer_ids:
            out.append((prompt_ids + answer_ids, len(prompt_ids) - 1))
    return out, records.describe()


# -- what every exit says at every answer position -----------------------------------------------------
@dataclass
class Observations:
    exits: list[int]  # the checked exits (all but the last)
    agree: torch.Tensor  # [E, N] bool: the exit's greedy token is the last exit's
    split: torch.Tensor  # [N] index into SPLITS
    records: dict[str, torch.Tensor]  # [E, N, ...] per name: what the measures' `record` kept, on the CPU
    agree_last: torch.Tensor | None = None  # [N] the last exit's token is the reference (None: always, exact K/V)
    exit_at: torch.Tensor | None = None  # [N] propagated runs: where the thresholds of the run made each position leave

    def part(self, name: str) -> torch.Tensor:
        return self.split == SPLITS.index(name)

    def at_exit(self, j: int) -> dict[str, torch.Tensor]:
        """The records of the j-th checked exit ([N, ...] each): what a measure's `score` reads."""
        return {k: v[j] for k, v in self.records.items()}

    def positions(self, keep: torch.Tensor) -> "Observations":
        """The observations at the positions `keep` [N] (bool) selects."""
        return Observations(self.exits, self.agree[:, keep], self.split[keep],
                            {k: v[:, keep] for k, v in self.records.items()},
                            None if self.agree_last is None else self.agree_last[keep],
                            None if self.exit_at is None else self.exit_at[keep])

    @classmethod
    def joined(cls, runs: list["Observations"]) -> "Observations":
        """The observations of consecutive runs of positions."""
        def cat(field: str, dim: int = 0):
            parts = [getattr(r, field) for r in runs]
            return None if parts[0] is None else torch.cat(parts, dim=dim)

        return cls(runs[0].exits, cat("agree", 1), cat("split"),
                   {k: torch.cat([r.records[k] for r in runs], dim=1) for k in runs[0].records},
                   cat("agree_last"), cat("exit_at"))


def checked_exits(sm: SortedModel) -> list[int]:
    if len(sm.exits) < 2:
        raise SortedChatError(f"{sm.source}: only one exit ({sm.num_layers}); nothing to calibrate")
    return sm.exits[:-1]


def score_exits(sm: SortedModel, raw: list[torch.Tensor], before: list[torch.Tensor], candidates: Candidates,
                reference: torch.Tensor, kinds: list[type[Measure]], split: torch.Tensor) -> Observations:
    """What each checked exit says at N positions (of the part `split` [N]), as auto mode's measures compute it
    (their `record`): `raw` [N, H] per exit, the state leaving it; `before` the state it follows; `reference`
    [N] the token it should agree with; `kinds` the measures whose records are kept."""
    agree, records = [], {}
    for e, h, b in zip(checked_exits(sm), raw, before):
        view = ExitView(sm, e, h, b, candidates)
        agree.append(view.logits.argmax(-1) == reference)
        for kind in kinds:
            for name, value in kind.record(view).items():
                records.setdefault(name, {})[e] = value
    return Observations(checked_exits(sm), torch.stack(agree).cpu(), split,
                        {name: torch.stack(list(per_exit.values())).cpu() for name, per_exit in records.items()})


@torch.inference_mode()
def observe(sm: SortedModel, sequences: list[tuple[list[int], int]], progress: Progress = quiet,
            kinds: list[type[Measure]] | None = None) -> Observations:
    """Every checked exit at every answer position, teacher-forced in one forward pass per example, recorded for
    the measures `kinds` (default: every registered one). The candidate sets are those auto mode builds when fed
    the answer in a fresh session: the top of the last exit's head at the position before, none at the first
    (the prompt is prefilled without a head)."""
    exits, runs, kinds = checked_exits(sm), [], kinds or list(MEASURES.values())
    for n, (ids, start) in enumerate(sequences):
        progress(f"scoring example {n + 1}/{len(sequences)}", n / len(sequences))
        out = sm.model(input_ids=torch.tensor([ids], device=sm.device), output_hidden_states=True, use_cache=False)
        states = [h[0, start : len(ids) - 1] for h in out.hidden_states]
        final = out.logits[0, start : len(ids) - 1]
        positions = range(start, len(ids) - 1)
        candidates = Candidates.of(sm, [ids[: pos + 1] for pos in positions], [[], *previous_top(final[:-1]).tolist()])
        runs.append(score_exits(sm, [states[e] for e in exits], [states[e] for e in [0, *exits[:-1]]], candidates,
                                final.argmax(-1), kinds, torch.full((len(positions),), SPLIT_OF[n % len(SPLIT_OF)])))
    return Observations.joined(runs)


@torch.inference_mode()
def observe_propagated(sm: SortedModel, sequences: list[tuple[list[int], int]], measure: Measure,
                       thresholds: list[float], parts: tuple[str, ...] = SPLITS, progress: Progress = quiet,
                       kinds: list[type[Measure]] | None = None) -> Observations:
    """What every exit says at every answer position when the K/V of earlier positions were propagated from
    where `thresholds` (on `measure`'s recorded confidence, as `simulate` applies them) made them leave; teacher
    forced, agreement with the exact full model's greedy token. Only the examples of `parts` run; the records
    kept are those of `kinds` (default: every registered measure), `measure`'s among them."""
    exits, L, state, runs = checked_exits(sm), sm.num_layers, LayeredState(sm), []
    kinds = list(dict.fromkeys([type(measure), *(kinds or MEASURES.values())]))
    chosen = [(n, x) for n, x in enumerate(sequences) if SPLITS[SPLIT_OF[n % len(SPLIT_OF)]] in parts]
    for k, (n, (ids, start)) in enumerate(chosen):
        progress(f"propagated K/V: example {k + 1}/{len(chosen)}", k / len(chosen))
        reference = sm.model(input_ids=torch.tensor([ids], device=sm.device), use_cache=False).logits[0].argmax(-1)
        state.reset()
        if start:
            state.run(L, ids[:start])
        top: list[int] = []  # the last exit's top at the position before (none at the first, as in `observe`)
        for pos in range(start, len(ids) - 1):
            raw = [state.run(e, [ids[pos]] if i == 0 else None)[:, -1] for i, e in enumerate(sm.exits)]  # [1, H] each
            before = [sm.embed(torch.tensor([ids[pos]], device=sm.device)), *raw[:-2]]
            candidates = Candidates.of(sm, [ids[: pos + 1]], [top])
            run = score_exits(sm, raw[:-1], before, candidates, reference[pos : pos + 1], kinds,
                              torch.tensor([SPLIT_OF[n % len(SPLIT_OF)]]))
            last = sm.head(raw[-1], L)
            top = previous_top(last[0]).tolist()
            conf = confidences(run, measure)
            leave = next((j for j, tau in enumerate(thresholds) if tau < 1.0 and conf[j, 0] >= tau), None)
            if leave is not None:
                state.refill(exits[leave], raw[leave][:, None])
            runs.append(replace(run, agree_last=(last.argmax(-1) == reference[pos]).cpu(),
                                exit_at=torch.tensor([L if leave is None else exits[leave]])))
    return Observations.joined(runs)


def fitted_measures(sm: SortedModel, obs: Observations, names: list[str],
                    progress: Progress = quiet) -> dict[str, Measure]:
    """The measures `names` as calibrate uses them, those that learn fitted on the `fit` part."""
    fit, measures = obs.positions(obs.part("fit")), {}
    for name in names:
        if MEASURES[name].learns:
            progress(f"fitting the {name} measure", None)
        measures[name] = MEASURES[name].fitted(sm, fit.exits, fit.records, fit.agree)
    return measures


def threshold_positions(obs: Observations, measure: Measure) -> torch.Tensor:
    """The positions a measure's thresholds are chosen on: the select part, and the fit part unless it learned
    from it."""
    return obs.part("select") | (obs.part("fit") if not measure.learns else False)


@torch.inference_mode()
def confidences(obs: Observations, measure: Measure) -> torch.Tensor:
    """[E, N] what `measure` says at every exit and position: its `score` of the records, on the CPU."""
    return torch.stack([measure.score(obs.at_exit(j), e).cpu() for j, e in enumerate(obs.exits)])


# -- thresholds ------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Thresholds of one measure and what they give on the held-out part."""

    measure: str
    thresholds: dict[int, float]
    agreement: float
    speedup: float
    mean_exit: float
    checks_per_token: float
    check_share: float  # check time per token / the time of a full-depth token
    per_exit: dict[int, dict] = field(default_factory=dict)


def simulate(conf: torch.Tensor, agree: torch.Tensor, exits: list[int], thresholds: list[float],
             costs: Costs, measure: str, L: int, agree_last: torch.Tensor | None = None,
             left_at: torch.Tensor | None = None) -> dict:
    """Auto mode on recorded confidences: where each position exits, its agreement and its cost. `agree_last`:
    whether the last exit agrees at each position (always, unless K/V were propagated before it); `left_at`:
    where a real run with these thresholds made each position leave (instead of applying them here)."""
    N = conf.shape[1]
    exit_at = torch.full((N,), L, dtype=torch.long)
    agrees = torch.ones(N, dtype=torch.bool) if agree_last is None else agree_last.clone()
    checks = torch.zeros(N)
    alive = torch.ones(N, dtype=torch.bool)
    for j, (e, tau) in enumerate(zip(exits, thresholds)):
        if tau >= 1.0:
            continue
        checks += alive.float()
        leave = alive & ((conf[j] >= tau) if left_at is None else (left_at == e))
        exit_at[leave] = e
        agrees[leave] = agree[j, leave]
        alive &= ~leave
    check_time = costs.per_token.get(measure, 0.0) + checks * costs.check.get(measure, 0.0)
    seconds = costs.step + costs.head + L * costs.layer - costs.early_exit_saving(exit_at.float(), L) + check_time
    full = costs.step + costs.head + L * costs.layer
    return {
        "agreement": float(agrees.float().mean()) if N else 1.0,
        "speedup": full / float(seconds.mean()) if N else 1.0,
        "mean_exit": float(exit_at.float().mean()) if N else float(L),
        "checks_per_token": float(checks.mean()) if N else 0.0,
        "check_share": float(check_time.mean() / full) if N else 0.0,
        "exit_at": exit_at,
        "agrees": agrees,
    }


def thresholds_for_precision(conf: torch.Tensor, agree: torch.Tensor, exits: list[int], precision: float,
                             costs: Costs, measure: str, L: int) -> list[float]:
    """Exit by exit, the lowest threshold whose exiting tokens agree at least `precision` of the time.

    Only tokens still running reach an exit. An exit whose tokens save less time (`Costs.early_exit_saving`:
    (L − e) layers each, less draining their backlog later) than checking every token that reaches it costs
    is not checked (threshold 1)."""
    check = costs.check.get(measure, 0.0)
    alive = torch.ones(conf.shape[1], dtype=torch.bool)
    out = []
    for j, e in enumerate(exits):
        c, a = conf[j, alive], agree[j, alive]
        tau = 1.0
        if len(c):
            order = torch.argsort(c, descending=True)
            cs = c[order]
            hits = torch.cumsum(a[order].double(), 0) / torch.arange(1, len(cs) + 1, dtype=torch.double)
            ok = hits >= precision
            ok[:-1] &= cs[:-1] > cs[1:]  # cut only between different confidences
            if ok.any():
                k = int(torch.nonzero(ok)[-1])
                if (k + 1) * costs.early_exit_saving(e, L) > len(c) * check:
                    tau = min(float(cs[k]), 1.0 - 1e-7)
        out.append(tau)
        if tau < 1.0:
            alive &= ~(conf[j] >= tau)
    return out


def plan(obs: Observations, conf: torch.Tensor, measure: str, target: float, costs: Costs, L: int,
         choose_on: torch.Tensor) -> Plan:
    """Thresholds chosen on the positions `choose_on` for the target agreement, judged on the `report` part:
    the lowest per-exit precision (bisection) whose plan still meets the target overall."""
    c, a, rep = conf[:, choose_on], obs.agree[:, choose_on], obs.part("report")
    last = None if obs.agree_last is None else obs.agree_last[choose_on]

    def at(precision):
        return thresholds_for_precision(c, a, obs.exits, precision, costs, measure, L)

    def meets(th):
        return simulate(c, a, obs.exits, th, costs, measure, L, last)["agreement"] >= target

    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if meets(at(mid)) else (mid, hi)
    best = at(hi)
    if not meets(best):  # full depth always meets the target
        best = [1.0] * len(obs.exits)
    result = simulate(conf[:, rep], obs.agree[:, rep], obs.exits, best, costs, measure, L,
                      None if obs.agree_last is None else obs.agree_last[rep])
    return judged(measure, best, result, obs.exits)


def judged(measure: str, thresholds: list[float], result: dict, exits: list[int]) -> Plan:
    """A plan from a result of `simulate` (or of a propagated run): its figures and where tokens leave."""
    per_exit = {}
    for e, tau in zip(exits, thresholds):
        here = result["exit_at"] == e
        per_exit[e] = {
            "threshold": round(tau, 6),
            "share": round(float(here.float().mean()), 4),
            "agreement": round(float(result["agrees"][here].float().mean()), 4) if here.any() else None,
        }
    return Plan(measure, dict(zip(exits, thresholds)), result["agreement"], result["speedup"], result["mean_exit"],
                result["checks_per_token"], result["check_share"], per_exit)


# -- the command ---------------------------------------------------------------------------------------
def check_options(target: float, measure: str | None, max_examples: int, kv: KV | str = KV.EXACT) -> None:
    try:
        kv_way(kv)
    except ModeError as exc:
        raise SortedChatError(f"--kv {kv}: {exc.problem}") from None
    if not 0.0 < target <= 1.0:
        raise SortedChatError(f"--target-agreement {target}: must be in (0, 1]")
    if measure is not None and measure not in MEASURES:
        raise SortedChatError(f"--measure {measure!r}: choose {', '.join(MEASURES)}")
    if max_examples < len(SPLIT_OF):
        raise SortedChatError(f"--limit {max_examples}: at least {len(SPLIT_OF)} are needed")


@dataclass
class Calibration:
    plans: dict[str, Plan]
    chosen: Plan
    costs: Costs
    data: dict
    positions: dict[str, int]
    measure: Measure | None = None  # the chosen plan's measure, as fitted (`write` saves what it learned)
    kv: KV = KV.EXACT
    start: Plan | None = None  # propagated K/V: the one-pass plan the propagated runs started from


def calibrate(sm: SortedModel, data: str, target: float = 0.95, measure: str | None = None, max_examples: int = 300,
              holdout: int = 0, progress: Progress = quiet, kv: KV | str = KV.EXACT) -> Calibration:
    """Measure, fit the measures that learn, choose thresholds; write nothing. With `kv` "propagate", the measure
    is chosen on the one-pass plans, and its thresholds and figures come from runs under propagation (module
    docstring)."""
    check_options(target, measure, max_examples, kv)
    kv = kv_way(kv)
    sequences, described = reference_sequences(sm, data, max_examples, holdout)
    names = [measure] if measure else list(MEASURES)
    obs = observe(sm, sequences, progress, [MEASURES[n] for n in names])
    measures = fitted_measures(sm, obs, names, progress)
    progress("timing layers, head and checks", None)
    context = sum(len(ids) for ids, _ in sequences) // len(sequences)
    costs = replace(measure_costs(sm, context=context, measures=measures), kv=kv)
    plans = {n: plan(obs, confidences(obs, m), n, target, costs, sm.num_layers, threshold_positions(obs, m))
             for n, m in measures.items()}
    chosen = max(plans.values(), key=lambda p: p.speedup) if measure is None else plans[measure]
    positions = {name: int(obs.part(name).sum()) for name in SPLITS}
    start = None
    if kv is KV.PROPAGATE:
        start, chosen = chosen, propagated_plan(sm, sequences, chosen, target, costs, measures[chosen.measure],
                                                progress)
        plans = {chosen.measure: chosen}
    return Calibration(plans, chosen, costs, described, positions, measures[chosen.measure], kv, start)


def propagated_plan(sm: SortedModel, sequences: list[tuple[list[int], int]], start: Plan, target: float, costs: Costs,
                    measure: Measure, progress: Progress = quiet) -> Plan:
    """Thresholds for propagated K/V: a propagated run over the fit and select parts at `start`'s thresholds,
    thresholds chosen again on what it recorded, then judged by a propagated run over the report part."""
    name, exits, L, kinds = start.measure, list(start.thresholds), sm.num_layers, [type(measure)]
    first = observe_propagated(sm, sequences, measure, list(start.thresholds.values()), ("fit", "select"), progress,
                               kinds)
    again = plan(first, confidences(first, measure), name, target, costs, L, threshold_positions(first, measure))
    final = [again.thresholds[e] for e in exits]
    check = observe_propagated(sm, sequences, measure, final, ("report",), progress, kinds)
    result = simulate(confidences(check, measure), check.agree, exits, final, costs, name, L,
                      check.agree_last, check.exit_at)
    return judged(name, final, result, exits)


def checkpoint_dir(sm: SortedModel) -> Path:
    """Where calibration writes: the model's own directory (the cached copy for the default model)."""
    directory = Path(sm.weights_path)
    if not directory.is_dir():
        raise SortedChatError(
            f"{sm.source}: calibration writes {CONFIG_NAME} beside the weights, and this model has no local "
            "directory (download it with `sortedchat pull` or save it first)"
        )
    return check_output_dir(directory, f"calibration writes {CONFIG_NAME} into")  # before the long part


def write(sm: SortedModel, result: Calibration, target: float) -> list[Path]:
    """Thresholds, measure and calibration record into `sortedchat.json` (atomic), and what the measure learned."""
    directory = checkpoint_dir(sm)
    written = result.measure.save(directory) if result.measure is not None else []
    cfg = SortedConfig.read(directory) if (directory / CONFIG_NAME).is_file() else SortedConfig()
    chosen = result.chosen
    cfg.exits = list(sm.exits)
    cfg.thresholds = {e: round(t, 6) for e, t in chosen.thresholds.items()}
    cfg.confidence = chosen.measure
    cfg.calibration = {
        "data": result.data,
        "target_agreement": target,
        "measure": chosen.measure,
        "positions": result.positions,
        "expected": {n: {"agreement": round(p.agreement, 4), "speedup": round(p.speedup, 3),
                         "mean_exit": round(p.mean_exit, 2), "check_share": round(p.check_share, 4)}
                     for n, p in result.plans.items()},
        "per_exit": {str(e): v for e, v in chosen.per_exit.items()},
        "kv": result.kv,
        "costs_ms": {"layer": round(result.costs.layer * 1e3, 4), "head": round(result.costs.head * 1e3, 4),
                     "drain_share": round(result.costs.drain, 3), "kv_fill": round(result.costs.kv_fill * 1e3, 4),
                     "check": {k: round(v * 1e3, 4) for k, v in result.costs.check.items()}},
        "device": str(sm.device),
        "dtype": str(sm.dtype).replace("torch.", ""),
        "quantized": describe_quantization(sm),  # int8 products cost otherwise, and agree otherwise
        "threads": torch.get_num_threads(),  # the costs above are this machine's at this thread count
    }
    written.append(cfg.write(directory))
    return written


def write_or_rescue(sm: SortedModel, result: Calibration, target: float) -> list[Path]:
    """`write`; should the model's directory refuse the files at the end (a full disk, a mount gone read-only),
    they go into the user data dir, beside a copy of its `sortedchat.json`, and the error says where."""
    directory = Path(sm.weights_path)

    def write_into(folder: Path) -> list[Path]:
        there = sm
        if folder != directory:
            folder.mkdir(parents=True, exist_ok=True)
            if (directory / CONFIG_NAME).is_file():
                shutil.copy2(directory / CONFIG_NAME, folder / CONFIG_NAME)
            there = copy.copy(sm)
            there.weights_path = str(folder)
        return write(there, result, target)

    return rescued(directory, "--model", write_into)
