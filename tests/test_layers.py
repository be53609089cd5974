"""The folders stand on each other one way (docs/architecture.md): checked from the imports."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "data_pipeline", "parallel", "pretrain", "launch")
# Each layer and the layers it may import (besides itself), bottom first. Inside
# pretrain/ the subfolders are layers too.
ALLOWED = {
    "common": set(),
    "data_pipeline": {"common"},
    "parallel": {"common"},
    "pretrain.model": {"common", "parallel"},
    "pretrain.config": {"common", "data_pipeline", "parallel", "pretrain.model"},
    "pretrain.checkpoint": {"common", "data_pipeline", "parallel", "pretrain.model"},
    "pretrain.hf": {"common", "data_pipeline", "parallel", "pretrain.model", "pretrain.checkpoint"},
    "pretrain.planning": {"common", "parallel", "pretrain.model", "pretrain.config"},
    "pretrain.training": {"common", "data_pipeline", "parallel", "pretrain.model", "pretrain.config",
                          "pretrain.checkpoint", "pretrain.hf", "pretrain.planning"},
    "pretrain.hydra_config": {"common", "pretrain.config"},
    "pretrain.tools": {"common", "data_pipeline", "parallel", "pretrain.model", "pretrain.config",
                       "pretrain.checkpoint", "pretrain.training", "pretrain.hydra_config",
                       "pretrain.planning"},
    "pretrain.main": {"common", "data_pipeline", "parallel", "pretrain.checkpoint", "pretrain.hf",
                      "pretrain.training", "pretrain.hydra_config"},
    # The Slurm launcher reads a run directory's lock before writing its script there.
    "launch": {"common", "data_pipeline", "parallel", "pretrain.config", "pretrain.hydra_config",
               "pretrain.checkpoint"},
}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def layer(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "pretrain" and len(parts) > 1 else parts[0]


def imports() -> dict[str, set[str]]:
    """Every project module and the project modules it imports (anywhere in its code)."""
    graph = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            found = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module)
            graph[module_name(path)] = {m for m in found if m.split(".")[0] in PACKAGES}
    return graph


def test_each_layer_imports_only_the_layers_below_it():
    graph = imports()
    assert "pretrain.training.trainer" in graph and "parallel.engine" in graph
    wrong = sorted(f"{module} imports {target}" for module, targets in graph.items() for target in targets
                   if layer(target) != layer(module) and layer(target) not in ALLOWED[layer(module)])
    assert wrong == []


def test_the_import_graph_has_no_circles():
    graph = imports()
    modules = set(graph)

    def resolve(name: str) -> str | None:  # `from pkg import module` names the package
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges = {m: {t for t in map(resolve, targets) if t and t != m} for m, targets in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_every_nameable_callback_has_a_builder():
    from pretrain.config import CALLBACK_NAMES
    from pretrain.training.build import CALLBACKS

    assert set(CALLBACKS) == set(CALLBACK_NAMES)
