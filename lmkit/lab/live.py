"""A live view of training in a notebook: a progress bar and the loss curves, redrawn as it runs.

`LiveTraining` is a `lmkit.train.Trainer` callback (the trainer calls it with every logged
event). Every `redraw_every` training events it replaces one output of the cell with an HTML
progress bar (step, loss, tokens per second, time left) and the figure of training and
validation loss so far, so the reader watches the curve fall instead of waiting for a wall of
logs. The last frame stays in the executed notebook. Outside IPython it prints one line per
redraw instead.
"""

from __future__ import annotations

import base64
import io
import time
from typing import Any

import matplotlib.pyplot as plt

__all__ = ["LiveTraining"]


class LiveTraining:
    """Trainer callback drawing progress and loss curves; `train` and `val` keep (step, loss)."""

    def __init__(self, total_steps: int, title: str = "Training loss", redraw_every: int = 5,
                 ylabel: str = "cross-entropy (nats per token)"):
        self.total_steps = total_steps
        self.title = title
        self.ylabel = ylabel
        self.redraw_every = redraw_every
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        self.tokens_per_s = 0.0
        self.started = time.perf_counter()
        self._events = 0
        self._handle = None
        try:
            from IPython import get_ipython
            from IPython.display import display

            if get_ipython() is not None:
                self._handle = display({"text/plain": "starting"}, raw=True, display_id=True)
        except ImportError:
            pass

    def __call__(self, event: dict[str, Any]) -> None:
        if event["kind"] == "train":
            self.train.append((event["step"], event["loss"]))
            self.tokens_per_s = event.get("tokens_per_s", self.tokens_per_s)
            self._events += 1
            if self._events % self.redraw_every == 0:
                self.draw()
        elif event["kind"] == "eval":
            self.val.append((event["step"], event["val_loss"]))

    def status(self) -> str:
        step, loss = self.train[-1] if self.train else (0, float("nan"))
        elapsed = time.perf_counter() - self.started
        left = elapsed / step * (self.total_steps - step) if step else float("nan")
        return (f"step {step}/{self.total_steps}  loss {loss:.3f}  {self.tokens_per_s:,.0f} tokens/s  "
                f"elapsed {elapsed:.0f} s  left ~{left:.0f} s")

    def figure(self) -> plt.Figure:
        fig, ax = plt.subplots(figsize=(7, 3.4))
        if self.train:
            ax.plot(*zip(*self.train, strict=True), label="training (one batch)", lw=1)
        if self.val:
            ax.plot(*zip(*self.val, strict=True), "o-", label="validation", lw=1.5)
        ax.set(xlabel="optimizer step", ylabel=self.ylabel, title=self.title)
        ax.set_xlim(0, self.total_steps)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        return fig

    def draw(self) -> None:
        if self._handle is None:
            print(self.status(), flush=True)
            return
        fig = self.figure()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        step = self.train[-1][0] if self.train else 0
        png = base64.b64encode(buf.getvalue()).decode()
        html = (f"<progress value='{step}' max='{self.total_steps}' style='width:60%'></progress> "
                f"<code>{self.status()}</code><br><img src='data:image/png;base64,{png}'/>")
        self._handle.update({"text/html": html, "text/plain": self.status()}, raw=True)

    def close(self) -> plt.Figure:
        """Replace the live frame by the final status line; return the figure of the whole run."""
        if self._handle is not None:
            self._handle.update({"text/plain": "finished: " + self.status()}, raw=True)
        return self.figure()
