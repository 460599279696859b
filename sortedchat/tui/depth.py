"""What the depth keys do: step through the model's exits, toggle auto and speculative, move thresholds.

Kept apart from the widgets so the rules are plain code: the app turns `DepthControl.mode()` into
`session.mode`, which the engine reads before every token.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from sortedchat.engine.modes import KV, Mode, ModeKind  # no torch: the app imports this before its loading screen shows

THRESHOLD_STEP = 0.05


def exit_agreement(config) -> dict[int, float]:
    """Each exit's measured quality: the share of held-out tokens whose top prediction at that exit is the full
    depth's, as `sortedchat train` evaluated the checkpoint at its end (`training.metrics.eval`, which JSON
    keys by strings). Empty for a checkpoint that was never evaluated: nothing is shown then."""
    measured = ((config.training or {}).get("metrics") or {}).get("eval") or {}
    return {int(layer): float(m["agree"]) for layer, m in measured.items() if isinstance(m, dict) and "agree" in m}


@dataclass
class DepthControl:
    """The user's choice of depth: `kind`, and `depth`, the fixed depth or the draft depth in speculative mode
    (remembered while auto mode is on, which has none). The rest of the mode is `settings`, a `Mode` whose
    fields the keys move and carry across switches: its `threshold` (a single auto threshold given on the command
    line; None: the model's calibrated per-exit thresholds, moved together by `shift`), `kv` (auto and fixed
    depth; speculative decoding is exact) and the drafting options. `agreement`: each exit's measured agreement
    with full depth (`exit_agreement`), said when a key moves to that exit."""

    exits: list[int]
    num_layers: int
    default_draft: int
    kind: ModeKind = ModeKind.DEPTH
    depth: int = 0
    settings: Mode = field(default_factory=Mode)
    agreement: dict[int, float] = field(default_factory=dict)

    @classmethod
    def for_model(cls, sm, mode: Mode) -> "DepthControl":
        return cls(
            exits=list(sm.exits),
            num_layers=sm.num_layers,
            default_draft=sm.default_draft_exit,
            kind=mode.kind,
            depth=mode.depth or (sm.default_draft_exit if mode.kind is ModeKind.SPECULATIVE else sm.num_layers),
            settings=mode,
            agreement=exit_agreement(sm.config),
        )

    def mode(self) -> Mode:
        s = self.settings
        if self.kind is ModeKind.AUTO:
            return Mode.auto(s.threshold, shift=s.shift, kv=s.kv)
        if self.kind is ModeKind.SPECULATIVE:
            return replace(s, kind=ModeKind.SPECULATIVE, depth=self.depth, threshold=None, shift=0.0, kv=KV.EXACT)
        return Mode.fixed(self.depth, kv=s.kv)

    def label(self) -> str:
        """The mode as the status line and an answer's header show it (`Mode.label`)."""
        return self.mode().label(self.num_layers)

    # -- keys; each returns a note for the user when the key could not do what it says ---------------
    def step(self, direction: int) -> str | None:
        """One exit shallower (-1) or deeper (+1). Leaves auto mode for a fixed depth; in speculative
        mode moves the draft depth, which stays below the last layer. Having moved, says how often the new
        depth agrees with full depth, where the checkpoint measured it."""
        top = self.num_layers - 1 if self.kind is ModeKind.SPECULATIVE else self.num_layers
        candidates = [e for e in self.exits if e <= top]
        if direction > 0:
            nxt = next((e for e in candidates if e > self.depth), None)
        else:
            nxt = next((e for e in reversed(candidates) if e < self.depth), None)
        was_auto = self.kind is ModeKind.AUTO
        if was_auto:
            self.kind = ModeKind.DEPTH
        if nxt is None:
            if was_auto:
                return None
            if self.kind is ModeKind.SPECULATIVE and direction > 0:
                return f"the draft depth must stay below {self.num_layers}"
            return "already at the deepest exit" if direction > 0 else "already at the shallowest exit"
        self.depth = nxt
        return self.quality_note()

    def quality_note(self) -> str | None:
        """"depth 21 · agrees with full depth on 48% of tokens", or None (full depth, or nothing measured)."""
        share = self.agreement.get(self.depth)
        if share is None or self.depth >= self.num_layers:
            return None
        what = "draft depth" if self.kind is ModeKind.SPECULATIVE else "depth"
        return f"{what} {self.depth} · agrees with full depth on {share:.0%} of tokens"

    def toggle_auto(self) -> None:
        self.kind = ModeKind.DEPTH if self.kind is ModeKind.AUTO else ModeKind.AUTO

    def toggle_kv(self) -> str | None:
        """Exact K/V (skipped layers computed when a deeper token needs them) or propagated (at once,
        approximate). Speculative decoding stays exact; the choice applies when auto or fixed depth returns."""
        kv = KV.PROPAGATE if self.settings.kv is KV.EXACT else KV.EXACT
        self.settings = replace(self.settings, kv=kv)
        if self.kind is ModeKind.SPECULATIVE:
            return f"{kv} K/V from auto or fixed depth on (speculative decoding keeps exact K/V)"
        return None

    def toggle_speculative(self) -> str | None:
        if self.kind is ModeKind.SPECULATIVE:
            self.kind = ModeKind.DEPTH
            return None
        self.kind = ModeKind.SPECULATIVE
        if self.depth >= self.num_layers:
            self.depth = self.default_draft
            return f"a draft needs a depth below {self.num_layers}: drafting at {self.depth}"
        return None

    def adjust_threshold(self, direction: int) -> str | None:
        """Raise (+1) or lower (-1) the auto thresholds by one step: the single command-line threshold if
        one was given, else every calibrated per-exit threshold together (a shift of at most ±1)."""
        s = self.settings
        if s.threshold is not None:
            self.settings = replace(s, threshold=round(min(1.0, max(0.0, s.threshold + direction * THRESHOLD_STEP)), 2))
            what = f"auto threshold {self.settings.threshold:.2f}"
        else:
            self.settings = replace(s, shift=round(min(1.0, max(-1.0, s.shift + direction * THRESHOLD_STEP)), 2))
            what = f"auto thresholds {self.settings.shift:+.2f}"
        return None if self.kind is ModeKind.AUTO else f"{what} (used in auto mode)"


def mode_range(modes: list[str]) -> str:
    """An answer's modes, in order: "Depth 30/30", "Depth 30/30 → Depth 15/30", or "mixed: A → … → Z"."""
    if len(modes) <= 2:
        return " → ".join(modes)
    return f"mixed: {modes[0]} → … → {modes[-1]}"
