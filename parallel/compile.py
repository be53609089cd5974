"""torch.compile policy: what `trainer.compile` compiles, and what `auto` resolves to."""

from __future__ import annotations

import torch

from parallel.groups import Topology


def compile_model(module: torch.nn.Module, mode: str, layer_types: tuple[type, ...] = ()) -> None:
    """torch.compile in place: the whole module ("model"), or each of its outermost submodules
    of `layer_types` ("layers"; the model says which types are its layers); "none" compiles
    nothing."""
    if mode == "model":
        module.compile()
    elif mode == "layers":
        for layer in outermost(module, layer_types):
            layer.compile()


def outermost(module: torch.nn.Module, types: tuple[type, ...]) -> list[torch.nn.Module]:
    """Submodules of `types` not inside another one of them, in module order."""
    if isinstance(module, types):
        return [module]
    return [found for child in module.children() for found in outermost(child, types)]


def resolve_compile(mode: str, topology: Topology) -> str:
    """`auto` becomes `model` on one process where inductor can build kernels, else `none`.

    Only the one-process layout has been measured and checked against eager
    with it (docs/benchmarks.md); other layouts compile when asked explicitly."""
    if mode != "auto":
        return mode
    if topology.world_size > 1:
        return "none"
    if topology.device.type == "cpu":
        try:  # inductor's CPU kernels are C++, built on the first steps
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception:
            return "none"
    return "model"
