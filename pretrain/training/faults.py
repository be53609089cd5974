"""Deterministic fault injection for the resume, guard and spike tests, driven by PRETRAIN_FAULT.

Unset, nothing here does anything. Otherwise PRETRAIN_FAULT holds entries
separated by `;`, each `POINT=STEPS` or `POINT=STEPS@RANK`:

    kill_after_step=6    SIGKILL once step 6 and its callbacks (logging, a save) are done
    kill_in_save=8       SIGKILL while saving step 8: engine state written, not yet committed
    nan_loss=5,6,7       the loss of steps 5, 6 and 7 becomes NaN, and so do its gradients
                         (the first time each is computed: a transient fault that a
                         rollback leaves behind)
    loss_spike=6         the loss of step 6 is multiplied by SPIKE_FACTOR, and so are its
                         gradients: a finite spike (its first micro-batch's, the first
                         time the step is computed, as for nan_loss)

`@RANK` limits an entry to one global rank.
"""

from __future__ import annotations

import os
import signal

ENV = "PRETRAIN_FAULT"
POINTS = ("kill_after_step", "kill_in_save", "nan_loss", "loss_spike")
SPIKE_FACTOR = 10.0


def parse(text: str) -> dict[str, tuple[set[int], int | None]]:
    faults = {}
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        point, _, value = entry.partition("=")
        steps, _, rank = value.partition("@")
        try:
            if point not in POINTS:
                raise ValueError
            faults[point] = ({int(s) for s in steps.split(",")}, int(rank) if rank else None)
        except ValueError:
            raise ValueError(f"{ENV}={text!r}: expected entries POINT=STEP[,STEP...][@RANK] "
                             f"with POINT one of {', '.join(POINTS)}") from None
    return faults


def active(point: str, step: int, rank: int) -> bool:
    text = os.environ.get(ENV)
    if not text:
        return False
    steps, only_rank = parse(text).get(point, (set(), None))
    return step in steps and only_rank in (None, rank)


def kill_if(point: str, step: int, rank: int) -> None:
    if active(point, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def poison_loss(module, next_step, rank: int):
    """Multiplies the model's per-token loss by NaN in training steps `nan_loss` names, and
    by SPIKE_FACTOR in those `loss_spike` names.

    `next_step()` gives the step being computed. Returns the hook handle, or
    None when no loss is to be poisoned.
    """
    text = os.environ.get(ENV)
    if not text or not {"nan_loss", "loss_spike"} & parse(text).keys():
        return None

    poisoned: set[tuple[str, int]] = set()

    def hook(mod, args, output):
        step = next_step()
        if not mod.training:
            return None
        for point, factor in (("nan_loss", float("nan")), ("loss_spike", SPIKE_FACTOR)):
            if (point, step) not in poisoned and active(point, step, rank):
                poisoned.add((point, step))  # one micro-batch is enough to spoil the step
                return output * factor
        return None

    return module.register_forward_hook(hook)
