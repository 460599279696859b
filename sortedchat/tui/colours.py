"""Exit colours for the app's current theme: readable (contrast >= 4.5:1) on the theme's background."""

from __future__ import annotations

from textual.app import App

from sortedchat.palette import RGB, exit_colour, hex_rgb

_backgrounds: dict[str, RGB] = {}


def theme_background(app: App) -> RGB:
    """The background tokens are drawn on; an ANSI theme's (the terminal's own) is taken as black or white."""
    theme = app.current_theme
    if theme.name not in _backgrounds:
        value = theme.to_color_system().generate()["background"]
        if value.startswith("#"):
            _backgrounds[theme.name] = hex_rgb(value)
        else:
            _backgrounds[theme.name] = (0, 0, 0) if theme.dark else (255, 255, 255)
    return _backgrounds[theme.name]


def themed_exit_colour(app: App, layer: int, num_layers: int, first_exit: int) -> str:
    return exit_colour(layer, num_layers, first_exit, theme_background(app))
