"""The callback interface: what runs around the training loop's steps.

Each method is given the `training.trainer.Trainer` running the loop (not
imported here: the trainer depends on this interface, not the other way).
"""

from __future__ import annotations


class Callback:
    def on_train_start(self, trainer) -> None: ...

    def on_step_end(self, trainer, metrics: dict) -> None: ...

    def on_train_end(self, trainer) -> None: ...
