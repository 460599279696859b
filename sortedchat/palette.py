"""Colours for exit layers, shared by the CLI and the chat app: shallow exits warm, full depth cool."""

from __future__ import annotations

# Shallow (fast) to deep (full): red, orange, yellow, green, cyan, blue.
STOPS = [(230, 57, 70), (244, 140, 6), (233, 196, 36), (82, 183, 136), (72, 202, 228), (100, 130, 240)]


def exit_colour(layer: int, num_layers: int, first_exit: int = 1) -> str:
    """A hex colour for `layer` on a scale from `first_exit` (warm) to `num_layers` (cool)."""
    span = max(1, num_layers - first_exit)
    t = min(1.0, max(0.0, (layer - first_exit) / span))
    pos = t * (len(STOPS) - 1)
    i = min(int(pos), len(STOPS) - 2)
    f = pos - i
    rgb = [round(a + (b - a) * f) for a, b in zip(STOPS[i], STOPS[i + 1])]
    return "#{:02x}{:02x}{:02x}".format(*rgb)
