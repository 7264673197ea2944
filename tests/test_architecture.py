"""The package's shape: no import cycles, no private APIs of other libraries, the public names of
the specification where they were, and every registered method through build → forward → one
training step per phase → save → load → identical logits."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import torch

from hclafter.core.checkpoint import load_weights, save_checkpoint
from hclafter.core.config import load_config, trained_groups
from hclafter.models import METHODS, build_model
from hclafter.core.runtime import Runtime
from hclafter.engine.training import (build_optimizer, param_groups, saved_parameter_names, set_trainable, train_step,
                                      trained_parameters)

from .conftest import ROOT, TINY_CONFIG

SRC = ROOT / "src" / "hclafter"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """hclafter modules a module imports when it runs (``if TYPE_CHECKING:`` blocks do not run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for child in node.body for n in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)
            if target and target.startswith("hclafter"):
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("hclafter")}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    return {name: {t for t in runtime_imports(path) if t in modules and t != name} for name, path in modules.items()}


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_import_graph_resolves_relative_imports():
    graph = import_graph()
    assert "hclafter.models.base" in graph["hclafter.models.hybrid"]
    assert "hclafter.core.config" in graph["hclafter.core.runtime"]


# aten operator handles are named by PyTorch's operator registry, not private Python API.
OPERATOR_NAMESPACE = "torch.ops.aten"


def test_no_private_names_of_other_modules_and_no_globals_lookup():
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "globals()" not in text, path
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = ast.unparse(node.value)
                assert owner in ("self", "cls", OPERATOR_NAMESPACE), f"{path}: {ast.unparse(node)}"
            if isinstance(node, ast.ImportFrom) and node.level:
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                assert not private, f"{path}: imports private names {private}"


@pytest.mark.parametrize("module, names", [
    ("hclafter.backbone", ["load_backbone", "Backbone"]),
    ("hclafter.model", ["NGA", "HybridCascadeLaFTer", "build_model"]),
    ("hclafter.losses", ["dual_task_loss", "stage_consistency_loss"]),
    ("hclafter.emotions", ["MIKELS8", "EKMAN6", "wheel_distance", "strategy1"]),
    ("hclafter", ["load_run", "from_pretrained"]),
])
def test_the_specification_names_stay_importable(module, names):
    imported = importlib.import_module(module)
    assert all(hasattr(imported, name) for name in names)


METHOD_CONFIGS = {path.stem: path for path in (ROOT / "configs" / "methods").glob("*.yaml")
                  if "mode:" not in path.read_text()}


def test_every_registered_method_has_a_method_config():
    assert {load_config([TINY_CONFIG, p]).model.method for p in METHOD_CONFIGS.values()} == set(METHODS)


@pytest.mark.parametrize("name", sorted(METHOD_CONFIGS))
def test_every_method_config_builds_trains_each_phase_saves_and_loads(name, tiny_backbone, tmp_path):
    path = METHOD_CONFIGS[name]
    cfg = load_config([TINY_CONFIG, path])
    embeddings = torch.randn(8, tiny_backbone.model.visual.output_dim, generator=torch.Generator().manual_seed(0))
    model = build_model(tiny_backbone, 8, cfg.model, class_embeddings=embeddings)
    groups = param_groups(model)
    optimizer = build_optimizer(groups, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    runtime = Runtime("cpu", "fp32")
    gen = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(4, 3, 32, 32, generator=gen), "label": torch.tensor([0, 1, 2, 3]),
             "distribution": torch.full((4, 8), 1 / 8), "index": torch.arange(4)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for phase in cfg.train.phases:
        set_trainable(model, groups, trained_groups(phase, False), phase.stages)
        model.train()
        step = train_step(model, batch, optimizer, scheduler, runtime, cfg, phase.consistency, ["x"] * 4)
        assert step["n"] == 4 and torch.isfinite(torch.tensor(step["loss"]))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(saved_parameter_names(model, cfg))
    # "Trained parameters" are exactly those a step of some phase moved.
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    assert trained_parameters(model, groups, cfg)["trained"] == sum(sizes[n] for n in changed)
    model.eval()
    with torch.no_grad():
        expected = model(batch["image"], return_stages=True)
    state = model.state_dict()
    save_checkpoint(tmp_path / "w.safetensors", {n: state[n] for n in saved_parameter_names(model, cfg)})

    def restore_tower() -> None:  # the tower is shared by every model built on the fixture
        for n, p in model.named_parameters():
            if n.startswith("visual."):
                p.data.copy_(before[n])

    restore_tower()
    fresh = build_model(tiny_backbone, 8, cfg.model, class_embeddings=embeddings)
    load_weights(fresh, tmp_path / "w.safetensors")
    with torch.no_grad():
        got = fresh.eval()(batch["image"], return_stages=True)
    restore_tower()
    assert torch.equal(got.logits, expected.logits) and torch.equal(got.stage_logits, expected.stage_logits)
