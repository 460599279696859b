"""Shown while the model loads, or while the default model is converted on first run."""

from __future__ import annotations

from textual.containers import Center, Middle
from textual.screen import Screen
from textual.widgets import Label, ProgressBar


class LoadingScreen(Screen):
    # A stage wider than the box (a long file name at 80 columns) keeps to one line: wrapped, it would push the
    # box up and down as the stages change.
    DEFAULT_CSS = """
    #loading-stage {
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    """

    def __init__(self, what: str):
        super().__init__()
        self.what = what
        self.stage: tuple[str, float | None] = ("starting", None)

    def compose(self):
        with Middle(), Center(id="loading"):
            yield Label("sortedchat", id="loading-title")
            yield Label(f"loading {self.what}", id="loading-what")
            yield ProgressBar(total=None, show_eta=False, id="loading-bar")
            yield Label("starting", id="loading-stage")

    def on_mount(self) -> None:
        self._show()

    def set_progress(self, stage: str, fraction: float | None = None) -> None:
        """Callable before the screen is composed (the loader starts at once) or once it is closing."""
        self.stage = (stage, fraction)
        self._show()

    def _show(self) -> None:
        labels = self.query("#loading-stage")
        if not labels:
            return  # not composed yet (on_mount shows it), or already gone
        stage, fraction = self.stage
        labels.first(Label).update(stage)
        bar = self.query_one(ProgressBar)
        if fraction is None:
            bar.update(total=None)
        else:
            bar.update(total=100, progress=round(100 * fraction))
