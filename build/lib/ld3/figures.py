"""The run's figures, drawn by a helper started before training.

Importing matplotlib takes about 0.4 s, as long as twenty training steps of the embedded model;
the helpers pay it while training runs (on another core), so the figures cost the user only their
drawing, and on a CPU run the two figures are drawn side by side by two helper processes (the
training process is idle by then). This module itself imports no plotting library.
"""

from __future__ import annotations

from concurrent.futures import Executor, Future

import torch

from ld3.io import background_executor


def _import_plots() -> None:
    """The slow part, done ahead of time: import matplotlib and render one small figure (fonts,
    log-scale ticks, PNG writer), so that the real figures find everything loaded."""
    import io

    import ld3.plots

    fig, ax = ld3.plots.plt.subplots(figsize=(2, 2))
    ax.plot([1, 2, 3], [1.0, 0.1, 0.01], label="warm-up")
    ax.set_yscale("log")
    ax.set_title("warm-up")
    ax.legend()
    fig.tight_layout()
    fig.savefig(io.BytesIO(), format="png", dpi=50)
    ld3.plots.plt.close(fig)


def draw(name: str, *args, **kwargs) -> None:
    """Run ``ld3.plots.<name>(*args, **kwargs)`` (in the helper)."""
    import ld3.plots

    getattr(ld3.plots, name)(*args, **kwargs)


class FigureHelper:
    """``with FigureHelper(device) as fig: ...; fig.draw("plot_curves", history, path)``; leaving the
    block waits for every figure (an error while drawing is raised there)."""

    def __init__(self, device: torch.device, processes: int = 2):
        self._pool: Executor = background_executor(device, _import_plots, processes)
        self._pending: list[Future] = [self._pool.submit(int)]  # start the helpers now

    def draw(self, name: str, *args, **kwargs) -> None:
        self._pending.append(self._pool.submit(draw, name, *args, **kwargs))

    def wait(self) -> None:
        for f in self._pending:
            f.result()
        self._pending.clear()

    def __enter__(self) -> "FigureHelper":
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=exc[0] is None, cancel_futures=True)
