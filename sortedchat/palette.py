"""Colours for exit layers, shared by the CLI and the chat app: shallow exits warm, full depth cool.

Tokens are text drawn in their exit's colour, so each colour must stay readable on the background it is
drawn on: given a background, `exit_colour` darkens (light background) or lightens (dark background) the
hue until its contrast ratio reaches `MIN_CONTRAST` (WCAG's 4.5:1 for body text). The chat app passes
its theme's background; the CLI, which cannot know the terminal's, uses the stops as they are.
"""

from __future__ import annotations

from functools import lru_cache

# Shallow (fast) to deep (full): red, orange, yellow, green, cyan, blue.
STOPS = [(230, 57, 70), (244, 140, 6), (233, 196, 36), (82, 183, 136), (72, 202, 228), (100, 130, 240)]
MIN_CONTRAST = 4.5
RGB = tuple[int, int, int]


def luminance(rgb: RGB) -> float:
    """WCAG relative luminance of an sRGB colour."""

    def linear(channel: int) -> float:
        c = channel / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: RGB, b: RGB) -> float:
    """WCAG contrast ratio of two colours, 1 (same) to 21 (black on white)."""
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def readable(rgb: RGB, background: RGB, minimum: float = MIN_CONTRAST) -> RGB:
    """`rgb` mixed with black (on a light background) or white (on a dark one), as little as needed for
    `minimum` contrast against `background`; the hue stays recognisable."""
    toward = (0, 0, 0) if luminance(background) > 0.18 else (255, 255, 255)
    for step in range(21):
        f = step / 20
        mixed = tuple(round(c + (t - c) * f) for c, t in zip(rgb, toward))
        if contrast(mixed, background) >= minimum:
            return mixed
    return toward


def hex_rgb(colour: str) -> RGB:
    colour = colour.lstrip("#")
    return int(colour[0:2], 16), int(colour[2:4], 16), int(colour[4:6], 16)


@lru_cache(maxsize=4096)  # the sparkline asks for every bar at each redraw
def exit_colour(layer: int, num_layers: int, first_exit: int = 1, background: RGB | None = None) -> str:
    """A hex colour for `layer` on a scale from `first_exit` (warm) to `num_layers` (cool), readable on
    `background` when one is given."""
    span = max(1, num_layers - first_exit)
    t = min(1.0, max(0.0, (layer - first_exit) / span))
    pos = t * (len(STOPS) - 1)
    i = min(int(pos), len(STOPS) - 2)
    f = pos - i
    rgb = tuple(round(a + (b - a) * f) for a, b in zip(STOPS[i], STOPS[i + 1]))
    if background is not None:
        rgb = readable(rgb, background)
    return "#{:02x}{:02x}{:02x}".format(*rgb)
