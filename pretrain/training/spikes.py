"""Loss-spike detection: a finite loss or gradient norm far above its recent values.

Each signal (the training loss, the gradient norm before clipping) keeps its
values over the last `window` accepted steps. A value is a spike when its
robust z-score, (value - median) / (1.4826 x MAD), is above `sigma_factor`,
once `warmup` values are there. The median and the median absolute deviation
(1.4826 x MAD is the standard deviation of normal noise) are robust: a few odd
values in the window barely move them. Only a rise counts, and the scale is at
least 1% of the median, so a signal that barely moves does not turn its
smallest wobble into a spike.

Only accepted steps enter the window: a finite loss, an update applied, no
spike. A spike (whatever is done about it), a refused update and a non-finite
step leave the window as it was, so a spike never raises the bar for the next.

What is done about a spike (`trainer.spike.action`): `log` records it and keeps
the update; `skip` refuses the update before it is applied, which is decided on
the gradient norm (`refuses`), the one signal known then (the loss is averaged
over the ranks, and on the pipeline's last stage only computed, once the step
is done), so a spike of the loss alone is recorded with the update kept;
`rollback` goes back to the newest checkpoint with the data that led there
skipped (`Trainer.rollback`).

Every rank reaches the same verdict: the loss is averaged over the
data-parallel ranks (the pipeline's last stage hands it to the other stages)
and the gradient norm is reduced over all ranks, so every rank feeds the same
numbers into the same windows. The windows are saved with each checkpoint and
come back with it (resume, rollback), so a resumed run decides as the
uninterrupted one would have.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

from pretrain.config import SPIKE_METRICS, SpikeConfig

MAD_TO_SIGMA = 1.4826  # sigma of normal noise over its median absolute deviation
RELATIVE_FLOOR = 0.01  # the scale of a window is at least this fraction of its median


@dataclass
class Spike:
    step: int
    loss: float
    grad_norm: float
    zscores: dict[str, float]  # of the signals that spiked
    window: int  # values the statistic was taken over
    action: str  # what was done: log | skip | rollback

    def record(self) -> dict:
        """The metrics record (metrics.jsonl, W&B, TensorBoard)."""
        return {"step": self.step, "spike/loss": self.loss, "spike/grad_norm": self.grad_norm,
                "spike/zscore": max(self.zscores.values()), "spike/metrics": ",".join(self.zscores),
                "spike/action": self.action}

    def describe(self) -> str:
        what = ", ".join(f"{name} {getattr(self, name):.4g} (z {z:.1f})" for name, z in self.zscores.items())
        done = {"log": "update kept", "skip": "update refused", "rollback": "rolling back"}[self.action]
        return f"step {self.step:>6}  spike: {what} over the last {self.window} steps; {done}"


class SpikeDetector:
    """The windows of recent accepted values, and the verdict on each step."""

    def __init__(self, cfg: SpikeConfig):
        self.cfg = cfg
        self.windows: dict[str, deque[float]] = {name: deque(maxlen=cfg.window) for name in SPIKE_METRICS}

    def zscore(self, metric: str, value: float) -> float | None:
        """The robust z-score of `value` against the window of `metric`; None while the
        window is still warming up, or for a value that is not finite."""
        window = self.windows[metric]
        if len(window) < self.cfg.warmup or not math.isfinite(value):
            return None
        median = statistics.median(window)
        mad = statistics.median(abs(x - median) for x in window)
        scale = max(MAD_TO_SIGMA * mad, RELATIVE_FLOOR * abs(median), 1e-12)
        return (value - median) / scale

    def spiked(self, loss: float, grad_norm: float) -> dict[str, float]:
        """The z-scores of the watched signals that are spikes (empty: none is)."""
        values = {"loss": loss, "grad_norm": grad_norm}
        scores = {name: self.zscore(name, values[name]) for name in self.cfg.metrics}
        return {name: z for name, z in scores.items() if z is not None and z > self.cfg.sigma_factor}

    def refuses(self, grad_norm: float) -> bool:
        """Whether an update with this gradient norm is refused before it is applied
        (`trainer.spike.action=skip`; asked by the engine, see `parallel.refuse`)."""
        return self.cfg.action == "skip" and "grad_norm" in self.spiked(math.nan, grad_norm)

    def check(self, step: int, loss: float, grad_norm: float, refused: bool) -> Spike | None:
        """The verdict on a finished step (`refused`: its update was not applied); an accepted
        step's values join the windows."""
        if self.cfg.action == "off":
            return None
        zscores = self.spiked(loss, grad_norm)
        if not zscores:
            if not refused and math.isfinite(loss):
                self.windows["loss"].append(loss)
                if math.isfinite(grad_norm):  # nan when the step does not measure it
                    self.windows["grad_norm"].append(grad_norm)
            return None
        action = self.cfg.action
        if action == "skip" and not refused:
            action = "log"  # a spike of the loss alone: the update was applied before it was known
        return Spike(step, loss, grad_norm, zscores, len(self.windows[next(iter(zscores))]), action)

    # --- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {name: list(window) for name, window in self.windows.items()}

    def load_state_dict(self, state: dict | None) -> None:
        """The windows of a checkpoint; None (a checkpoint written without them) empties them."""
        for name, window in self.windows.items():
            window.clear()
            window.extend((state or {}).get(name, ()))
