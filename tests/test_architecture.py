"""The package's shape: layers that import only downwards, no import cycles, no private APIs of
other libraries, the public names of the specification where they were, and every registered
method through build → forward → its fit and one training step per phase → save → load →
identical logits."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import torch

from hclafter.core.checkpoint import load_weights, save_checkpoint
from hclafter.core.config import load_config, phase_groups
from hclafter.core.emotions import MIKELS8
from hclafter.core.runtime import Runtime
from hclafter.engine.loop import TrainState, train_step
from hclafter.engine.optim import build_optimizer, param_groups, saved_parameter_names, set_trainable, trained_parameters
from hclafter.models import METHODS, LabelledFeatures, build_model

from .conftest import ROOT, TINY_CONFIG

SRC = ROOT / "src" / "hclafter"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """hclafter modules a module imports, anywhere in it (``if TYPE_CHECKING:`` blocks included: a
    layer is kept for the type checker too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
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
    return {name: {t for t in imports_of(path) if t in modules and t != name} for name, path in modules.items()}


# The layers, lowest first. A module imports only modules of its own folder and of lower layers;
# models and data share a layer and do not import each other. The top layer is the package's API:
# hclafter itself and the specification's import paths.
LAYERS = [{"version"}, {"core"}, {"models", "data"}, {"engine"}, {"reporting"}, {"apps"},
          {"hclafter", "__main__", "backbone", "model", "losses", "emotions"}]


def layer_of(module: str) -> tuple[int, str]:
    folder = module.split(".")[1] if "." in module else module
    for floor, names in enumerate(LAYERS):
        if folder in names:
            return floor, folder
    raise AssertionError(f"{module} belongs to no layer: add its folder to LAYERS in tests/test_architecture.py")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``module -> target`` for every import that does not point down the layers."""
    bad = []
    for module, targets in sorted(graph.items()):
        floor, folder = layer_of(module)
        for target in sorted(targets):
            target_floor, target_folder = layer_of(target)
            if target_folder != folder and target_floor >= floor:
                bad.append(f"{module} -> {target}")
    return bad


def test_every_import_points_down_the_layers():
    assert upward_imports(import_graph()) == []


def test_the_layer_check_sees_an_import_that_points_up():
    graph = import_graph()
    graph["hclafter.core.config"] = graph["hclafter.core.config"] | {"hclafter.models"}
    graph["hclafter.models.hybrid"] = graph["hclafter.models.hybrid"] | {"hclafter.data.loading"}
    assert upward_imports(graph) == ["hclafter.core.config -> hclafter.models",
                                     "hclafter.models.hybrid -> hclafter.data.loading"]


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
    model = build_model(tiny_backbone, 8, cfg.model, class_embeddings=embeddings, class_names=MIKELS8.classes)
    groups = param_groups(model)
    optimizer = build_optimizer(groups, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    runtime = Runtime("cpu", "fp32")
    gen = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(4, 3, 32, 32, generator=gen), "label": torch.tensor([0, 1, 2, 3]),
             "distribution": torch.full((4, 8), 1 / 8), "index": torch.arange(4)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = TrainState(cfg=cfg, out_dir=tmp_path, runtime=runtime, model=model, plain=model, groups=groups,
                       saved_names=saved_parameter_names(model, cfg), optimizer=optimizer, scheduler=scheduler,
                       loaders={}, train_sampler=None, train_paths=["x"] * 4, wheel=MIKELS8,
                       identity=tiny_backbone.identity, fingerprint={})
    if model.uses_split_features:  # a fit on features of 8 images, one per class, as train and val alike
        with torch.no_grad():
            split = LabelledFeatures(model.forward_features(torch.randn(8, 3, 32, 32, generator=gen)), torch.arange(8))
        model.fit(split, split)
    for phase in cfg.train.phases if model.trained_by_gradient else ():
        set_trainable(model, groups, phase_groups(phase, False), phase.stages)
        model.train()
        step = train_step(state, batch, phase)
        assert step["n"] == 4 and torch.isfinite(torch.tensor(step["loss"]))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(saved_parameter_names(model, cfg))
    # "Trained parameters" are exactly those a step of some phase moved.
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    assert trained_parameters(model, groups, cfg)["trained"] == sum(sizes[n] for n in changed)
    model.eval()
    with torch.no_grad():
        expected = model(batch["image"], return_stages=True)
    weights = model.state_dict()
    save_checkpoint(tmp_path / "w.safetensors", {n: weights[n] for n in saved_parameter_names(model, cfg)})

    def restore_tower() -> None:  # the tower is shared by every model built on the fixture
        for n, p in model.named_parameters():
            if n.startswith("visual."):
                p.data.copy_(before[n])

    restore_tower()
    fresh = build_model(tiny_backbone, 8, cfg.model, class_embeddings=embeddings, class_names=MIKELS8.classes)
    fresh.size_like({n: weights[n].shape for n in saved_parameter_names(model, cfg)})
    load_weights(fresh, tmp_path / "w.safetensors")
    with torch.no_grad():
        got = fresh.eval()(batch["image"], return_stages=True)
    restore_tower()
    assert torch.equal(got.logits, expected.logits) and torch.equal(got.stage_logits, expected.stage_logits)
