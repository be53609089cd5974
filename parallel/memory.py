"""Bytes on each rank, measured: parameters, gradients and optimizer states, and the peak of a step.

`record` walks what the DeepSpeed engine actually holds on this rank (module
parameters, ZeRO-3 partitions, flat bit16 buffers, fp32 master copies, Adam
moments, gradient partitions and buckets) and counts every storage once.
`FirstStepMemory` runs it inside the first optimizer step, while gradients,
master copies and moments all exist; `parallel.memory_plan` predicts the same
numbers without building anything. `PeakTrace` follows every tensor's storage
through a training step and reports the most bytes alive at once: what the
planner's peak (those states plus activations) predicts.
"""

from __future__ import annotations

import gc
import warnings
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from parallel.memory_plan import RankMemory


# --- measurement ----------------------------------------------------------------------------

class _Ledger:
    """Storages seen so far, each counted once, under the first category that claims it.

    It keeps the storages it has counted alive, so that an address freed and
    reused within one measurement is not mistaken for the same storage.
    """

    def __init__(self):
        self.held: dict[int, torch.UntypedStorage] = {}
        self.bytes = {"parameters": 0, "gradients": 0, "optimizer": 0, "master_gradients": 0}

    def add(self, tensor, category: str) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in self.held:
            return
        self.held[storage.data_ptr()] = storage
        self.bytes[category] += storage.nbytes()

    def walk(self, value, category: str, depth: int = 0) -> None:
        """Tensors reachable from a DeepSpeed optimizer's attributes (lists, dicts, its helpers)."""
        if depth > 4:
            return
        if isinstance(value, torch.Tensor):
            self.add(value, category)
            if value.grad is not None:
                self.add(value.grad, "master_gradients" if category == "optimizer" else "gradients")
        elif isinstance(value, (list, tuple, set)):
            for item in value:
                self.walk(item, category, depth + 1)
        elif isinstance(value, dict):
            for item in value.values():
                self.walk(item, category, depth + 1)
        elif type(value).__module__.startswith("deepspeed") and hasattr(value, "__dict__") \
                and not isinstance(value, torch.nn.Module):
            self.walk_attributes(value, category, depth + 1)

    def walk_attributes(self, obj, category: str, depth: int = 0) -> None:
        for name, value in vars(obj).items():
            # Gradient partitions, reduction buckets ("ipg") and their flat buffers.
            is_grad = "grad" in name.lower() or "ipg" in name.lower()
            self.walk(value, "gradients" if is_grad else category, depth)

    def memory(self, offloaded: bool) -> RankMemory:
        b = self.bytes
        if offloaded:  # fp32 master weights, their gradients and the moments live in host memory
            return RankMemory(b["parameters"], b["gradients"], 0, b["optimizer"] + b["master_gradients"])
        return RankMemory(b["parameters"], b["gradients"] + b["master_gradients"], b["optimizer"], 0)


def innermost_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that DeepSpeed's mixed-precision / ZeRO wrappers drive."""
    optimizer = engine.optimizer
    while not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def record(engine, ledger: _Ledger) -> None:
    """Adds what the engine holds right now to `ledger`.

    Parameters are the module's weights as stored here (ZeRO-3: this rank's
    partition, plus the weights it keeps whole); gradients are every gradient
    buffer and partition; optimizer states are fp32 master copies (where they
    are not the module's own weights) and the Adam moments.
    """
    for param in engine.module.parameters():
        ledger.add(getattr(param, "ds_tensor", None), "parameters")
        ledger.add(param.data, "parameters")
    for param in engine.module.parameters():
        ledger.add(param.grad, "gradients")
    inner = innermost_optimizer(engine)
    if inner is not engine.optimizer:
        ledger.walk_attributes(engine.optimizer, "optimizer")
    for group in inner.param_groups:
        for param in group["params"]:
            ledger.walk(param, "optimizer")
    for state in inner.state.values():
        ledger.walk(state, "optimizer")


def is_offloaded(engine) -> bool:
    return bool(engine.zero_cpu_offload())


class FirstStepMemory:
    """What the engine allocates for its first optimizer step, measured during that step.

    DeepSpeed creates and frees gradient partitions group by group while it
    steps, so every storage seen before and after each update of the inner
    torch optimizer is counted (once), until the first step is over.
    """

    def __init__(self, engine):
        self._engine = engine
        self._ledger = _Ledger()
        self._measured: RankMemory | None = None
        self._start: int | None = None  # the engine's step count when the measured step began
        inner = innermost_optimizer(engine)
        self._handles = [inner.register_step_pre_hook(self._hook), inner.register_step_post_hook(self._hook)]

    def _done(self) -> bool:
        return self._start is not None and self._engine.global_steps > self._start

    def _hook(self, *_):
        if self._ledger is None:
            return
        if self._start is None:  # a resumed run starts counting where its checkpoint left off
            self._start = self._engine.global_steps
        if self._done():
            self._freeze()
        else:
            record(self._engine, self._ledger)

    def _freeze(self) -> None:
        if self._ledger is not None:
            self._measured = self._ledger.memory(is_offloaded(self._engine))
            self._ledger = None  # let go of the storages it kept alive

    def result(self) -> RankMemory | None:
        """The measurement, once the first step has run (None before)."""
        if not self._done():
            return None
        self._freeze()
        for handle in self._handles:  # removed here, never while the optimizer runs its hooks
            handle.remove()
        self._handles = []
        return self._measured


class PeakTrace(TorchDispatchMode):
    """The most bytes of tensor storage alive at once while it is active: a tensor-lifetime trace.

    It starts from what `engine` holds (`record`: parameters, gradients,
    optimizer states), or without an engine from every storage a live Python
    tensor reaches; then it adds every storage an operator creates, until that
    storage is freed (a weak reference's callback). Process RSS would include the
    allocator's slack and the interpreter; this counts what tensors hold, as
    `torch.cuda.max_memory_allocated` does on a GPU. Storages that C++ allocates
    outside the dispatcher (communication buffers) are not seen.
    """

    def __init__(self, engine=None):
        super().__init__()
        self.engine = engine
        self.live: dict[int, int] = {}  # storage address -> bytes
        self.now = 0
        self.peak = 0
        self.baseline = 0

    def __enter__(self):
        gc.collect()
        if self.engine is not None:
            ledger = _Ledger()
            record(self.engine, ledger)
            storages = list(ledger.held.values())
        else:
            with warnings.catch_warnings():  # isinstance on deprecated torch objects warns
                warnings.simplefilter("ignore")
                # Plain tensors and parameters: subclasses left by torch.compile (fake or
                # functional tensors) have no storage to count.
                storages = [obj.untyped_storage() for obj in gc.get_objects()
                            if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type != "meta"]
        for storage in storages:
            self._track(storage)
        self.baseline = self.now
        return super().__enter__()

    def _track(self, storage: torch.UntypedStorage) -> None:
        try:
            address, nbytes = storage.data_ptr(), storage.nbytes()
        except RuntimeError:  # a storage without data (a fake tensor's)
            return
        if nbytes == 0 or address in self.live:
            return
        self.live[address] = nbytes
        self.now += nbytes
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._freed, address, nbytes)

    def _freed(self, address: int, nbytes: int) -> None:
        if self.live.get(address) == nbytes:
            del self.live[address]
            self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.device.type != "meta" and not value.is_sparse:
                self._track(value.untyped_storage())
        return out


def format_bytes(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    raise AssertionError
