"""The demo: the synthetic emotion world, the shipped toy CLIP, and ``hclafter demo``."""
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hclafter.data import world
from hclafter.models.backbone import backbone_from_config, load_backbone
from hclafter.engine.frozen import zeroshot_eval
from hclafter.core.config import load_config
from hclafter.data import load_splits
from hclafter.apps.cli import build_parser, command
from hclafter.apps.demo import (METHODS, TOY_CLIP_ZEROSHOT_ACCURACY, cmd_demo, demo_budgets, demo_config, demo_methods,
                                demo_descriptions, demo_plan, format_table, plot_comparison, toy_clip_dir,
                                toy_clip_model_cfg, verdicts, write_demo_report)
from hclafter.core.emotions import MIKELS8
from hclafter.models import method_class
from hclafter.models.text import load_descriptions

from .conftest import ROOT

WEIGHTS = toy_clip_dir() / "toy_clip.safetensors"


def test_world_is_deterministic_per_seed_with_distributions_summing_to_one():
    for conditions in (world.CLEAN, world.WILD):
        a = world.generate(4, 24, 7, conditions)
        b = world.generate(4, 24, 7, conditions)
        c = world.generate(4, 24, 8, conditions)
        assert len(a) == 32 and [im.label for im in a] == [label for label in range(8) for _ in range(4)]
        assert all(np.array_equal(x.image, y.image) and np.array_equal(x.distribution, y.distribution)
                   for x, y in zip(a, b))
        assert not all(np.array_equal(x.image, y.image) for x, y in zip(a, c))
        for im in a:
            assert im.image.shape == (24, 24, 3) and im.image.dtype == np.uint8
            assert im.distribution.sum() == pytest.approx(1.0) and (im.distribution >= 0).all()
            assert im.distribution.argmax() == im.label  # the label keeps the most votes
            assert im.secondary in ((im.label + 1) % 8, (im.label - 1) % 8)  # ambiguity with a wheel neighbour
            assert 0 <= im.mix <= world.MAX_MIX
    assert len({tuple(im.distribution) for im in world.generate(20, 16, 0, world.WILD)}) > 40  # soft, per image


def test_world_cues_separate_the_emotions():
    """Mean colour alone tells clean images apart far better than chance (a sanity check of the cues)."""
    images = world.generate(30, 16, 0)
    means = np.stack([im.image.reshape(-1, 3).mean(0) for im in images])
    labels = np.array([im.label for im in images])
    centroids = np.stack([means[labels == c].mean(0) for c in range(8)])
    nearest = np.linalg.norm(means[:, None] - centroids[None], axis=-1).argmin(1)
    assert (nearest == labels).mean() > 0.5


def test_captions_name_what_is_drawn_and_vary():
    images = world.generate(3, 16, 0)
    captions = world.captions(images, 5, 1)
    assert captions == world.captions(images, 5, 1)
    flat = [c for group in captions for c in group]
    assert len(set(flat)) > 0.8 * len(flat)
    assert all(c and len(c.split()) < 60 for c in flat)
    emotion_words = {w for name in world.CLASSES for w in [name, *world.NOUNS[name], *world.ADJECTIVES[name]]}
    assert sum(any(w in c for w in emotion_words) for c in flat) > len(flat) // 2


def test_synthetic_manifest_carries_the_world_distributions(tmp_path):
    cfg = load_config([], ["data.synthetic.per_class=3", "data.synthetic.image_size=16", "data.distribution.source=dataset"])
    data = load_splits(cfg.data, 0, tmp_path)
    samples = [s for split in ("train", "val", "test") for s in data[split]]
    assert len(samples) == 24
    for s in samples:
        assert sum(s.distribution) == pytest.approx(1.0, abs=1e-4)
        assert int(np.argmax(s.distribution)) == s.label
    other = load_config([], ["data.synthetic.per_class=4", "data.synthetic.image_size=16",
                             f"data.root={tmp_path / 'mine'}"]).data
    load_splits(other, 0, tmp_path)
    other.synthetic.seed = 1  # the same folder with other settings is refused, not silently re-used
    with pytest.raises(Exception, match="other settings"):
        load_splits(other, 0, tmp_path)


def test_shipped_toy_clip_is_small_and_loads_through_the_backbone_loader():
    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size < 25e6
    cfg = toy_clip_model_cfg()
    assert cfg["vision_cfg"]["layers"] == 12 and cfg["text_cfg"]["vocab_size"] == 49408
    backbone = load_backbone("toy-clip", str(WEIGHTS), model_cfg=cfg)
    assert backbone.identity["weights"]["file"] == "toy_clip.safetensors"
    assert backbone.identity["quick_gelu"] is False
    with torch.no_grad():
        text = backbone.model.encode_text(backbone.tokenizer(["a photo that evokes awe.", "rain falling."]))
        image = backbone.model.encode_image(torch.zeros(1, 3, 32, 32))
    assert text.shape == (2, cfg["embed_dim"]) and image.shape == (1, cfg["embed_dim"])
    assert torch.isfinite(text).all() and torch.isfinite(image).all()


def test_shipped_toy_clip_gives_the_documented_zeroshot_accuracy(tmp_path):
    """Measured on the world and size the toy CLIP was trained for: 'wild', 150 images per class."""
    cfg = demo_config(tmp_path, device="cpu", world="wild")
    cfg.data.synthetic.per_class = 150
    assert backbone_from_config(cfg.backbone).identity["weights"]["sha256"]
    accuracy = zeroshot_eval(cfg, "test", progress=False)["accuracy"]
    # 219 of 360 test images, on the machine that stored it and here: the constant is rounded (3e-4)
    # and another CPU's kernels may flip a near-tie or two (1/360 each); more is a change.
    assert accuracy == pytest.approx(TOY_CLIP_ZEROSHOT_ACCURACY, abs=0.006)
    assert accuracy > 2 / 8


def test_readme_documents_the_zeroshot_accuracy():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"{TOY_CLIP_ZEROSHOT_ACCURACY:.3f}" in readme


def test_demo_descriptions_fit_the_toy_clip():
    backbone = load_backbone("toy-clip", str(WEIGHTS), model_cfg=toy_clip_model_cfg())
    corpus = load_descriptions(MIKELS8, str(demo_descriptions()))
    assert all(len(corpus[c]) >= 20 for c in MIKELS8.classes)
    assert all(len(backbone.tokenizer.encode(t)) + 2 <= 77 for texts in corpus.values() for t in texts)


def test_configs_demo_yaml_is_the_demo_config():
    from_yaml = load_config([ROOT / "configs" / "demo.yaml"])
    ours = demo_config(None, device=from_yaml.device)
    assert Path(from_yaml.backbone.pretrained).resolve() == WEIGHTS.resolve()
    assert Path(from_yaml.text.descriptions).resolve() == demo_descriptions().resolve()
    for cfg in (from_yaml, ours):
        cfg.backbone.pretrained = cfg.text.descriptions = None
    assert from_yaml == ours  # the shipped settings, and the toy CLIP's architecture as in its config.json


def test_demo_runs_every_method_with_its_own_schedule_and_the_demo_settings():
    hybrid, lafter = demo_config(method="hybrid"), demo_config(method="lafter")
    assert lafter.model.stages == [[12]] and not lafter.model.stage_adapters
    assert hybrid.model.prompt_tokens == lafter.model.prompt_tokens == 8  # the demo's, not the method config's 50
    assert lafter.train.phases != hybrid.train.phases and lafter.train.lr == hybrid.train.lr
    assert lafter.name == "LaFTer-sup (last block)" and lafter.data == hybrid.data
    assert {demo_config(method=m).name for m in METHODS} >= {"LaFTer-sup + adapter", "LaFTer (label-free)"}
    plan = demo_plan(Path("/tmp/x"), 2, "clean")
    assert len(plan) == 2 * len(METHODS) and {r.seed for r in plan} == {0, 1}
    assert all(load_config(r.configs, r.overrides).data.synthetic.world == "clean" for r in plan[:2])
    assert all(load_config(r.configs, r.overrides).train.log_with == [] for r in plan[:2])


def test_the_ablations_are_rows_after_the_headline_only_when_asked_for():
    assert "hybrid_no_adapters" not in METHODS and demo_methods() == METHODS
    with_ablations = demo_methods(ablations=True)
    at = with_ablations.index("hybrid")
    assert with_ablations[at + 1:at + 3] == ("hybrid_no_adapters", "hybrid_shared_adapter")
    assert [m for m in with_ablations if m in METHODS] == list(METHODS)
    plan = demo_plan(Path("/tmp/x"), 1, "clean", methods=with_ablations)
    assert [r.method for r in plan] == list(with_ablations)
    assert build_parser().parse_args(["demo", "--ablations"]).ablations
    assert not build_parser().parse_args(["demo"]).ablations


def test_every_trained_demo_method_has_its_studied_step_budget():
    budgets = demo_budgets()
    trained = {m for m in demo_methods(ablations=True) if demo_config(method=m).mode == "train"
               and method_class(demo_config(method=m).model.method).trained_by_gradient}
    assert set(budgets) == trained  # none falls back to its config's epochs
    assert all(demo_config(method=m).train.steps == budgets[m] for m in trained)
    assert demo_config(method="linear_probe").train.steps is None


def _row(key: str, val: float, test: float) -> dict:
    return {"key": key, "method": key.upper(), "val_accuracy": (val, 0.01), "accuracy": (test, 0.01),
            "comparison": None if key == "hybrid" else {"difference": 0.8 - test, "p_value": 0.01, "verdict": "better",
                                                        "ci": [0.8 - test - 0.02, 0.8 - test + 0.02]}}


def test_the_strongest_baseline_is_chosen_on_validation_never_test():
    rows = [_row("hybrid", 0.8, 0.8), _row("lafter_adapter", 0.9, 0.79), _row("hybrid_no_adapters", 0.95, 0.7),
            _row("linear_probe", 0.85, 0.6), _row("coop", 0.7, 0.75)]
    lines = verdicts(rows)
    # coop has the best test accuracy of the baselines, the linear probe the best validation accuracy;
    # the control and the ablation are not baselines however high their validation accuracy
    assert lines == ["HYBRID vs the strongest baseline (best validation accuracy, 85.0 ± 1.0 %), LINEAR_PROBE: "
                     "Δ accuracy +20.0 [+18.0, +22.0] points, McNemar p 0.01: better.",
                     "HYBRID vs the capacity-matched control, LAFTER_ADAPTER: Δ accuracy +1.0 [-1.0, +3.0] points, "
                     "McNemar p 0.01: better."]



def _full_row(key: str, accuracy: float) -> dict:
    spread = (0.5, 0.1)
    return {**_row(key, accuracy, accuracy), "seeds": 3, "macro_f1": (accuracy, 0.02), "kl": spread,
            "kl_calibrated": spread, "ece": spread, "ece_calibrated": spread, "trained": 1000,
            "added_vs_reference": 10, "still_improving": 0, "test_images": [152]}


def test_the_report_page_splits_the_wide_table_and_states_both_times(tmp_path):
    rows = [_full_row(k, 0.5 + 0.03 * i) for i, k in enumerate(("linear_probe", "lafter", "lafter_adapter", "hybrid"))]
    (tmp_path / "plots").mkdir()
    plot_comparison(rows, 0.125, tmp_path / "plots" / "accuracy.png", "mixed")
    (tmp_path / "plots" / "world_samples.png").write_bytes((tmp_path / "plots" / "accuracy.png").read_bytes())
    info = {"world": "mixed", "world_description": "x.", "worlds": ["mixed"], "seeds": 3, "classes": ["a", "b"],
            "num_samples": {"train": 1, "val": 1, "test": 1}, "random_backbone": False, "workers": 2,
            "time_s": 12.4, "runs_wall_s": 3600.0, "ablations": True}
    write_demo_report(tmp_path, rows, 0.125, info)
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    assert "--seeds 3 --ablations`" in md  # the re-run line runs the same rows
    assert "12 s for this invocation" in md and "the runs' own wall times add up to 3600 s, in 2 process(es)" in md
    assert md.count("\n| method |") == 1  # one table in report.md
    # the page: two tables of at most 7 columns each, every row in both, the method first
    tables = page.split("<table>")[1:]
    assert len(tables) == 2
    assert [len(re.findall(r"<th[ >]", t)) for t in tables] == [7, 7]
    assert all(t.count("<tr>") == len(rows) + 1 and "HYBRID" in t for t in tables)


def test_pretraining_and_demo_images_come_from_different_seeds():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_toy_clip", ROOT / "scripts" / "train_toy_clip.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.MODEL_CFG == toy_clip_model_cfg()
    pretraining = world.generate(2, 16, np.random.SeedSequence([0, script.IMAGE_STREAM]))
    demo = world.generate(2, 16, demo_config().data.synthetic.seed, world.WILD)
    assert not any(np.array_equal(a.image, b.image) for a in pretraining for b in demo)


def test_demo_cli_parser_and_table():
    parser = build_parser()
    args = parser.parse_args(["demo", "--out", "somewhere", "--seeds", "1", "--world", "blur"])
    assert args.out == "somewhere" and args.device == "auto" and args.seeds == 1 and args.world == "blur"
    defaults = parser.parse_args(["demo"])
    assert defaults.out == "runs/demo" and defaults.seeds == 3 and defaults.world is None
    assert command(args) is cmd_demo
    rows = [{"method": "zero-shot CLIP", "accuracy": (0.5, 0.0), "macro_f1": (0.4, 0.0), "kl_calibrated": (1.0, 0.0),
             "comparison": {"difference": 0.25, "ci": [0.2, 0.3], "p_value": 0.001, "verdict": "better"},
             "still_improving": 0, "seeds": 1},
            {"method": "HybridCascade-LaFTer", "accuracy": (0.75, 0.01), "macro_f1": (0.7, 0.02),
             "kl_calibrated": (0.5, 0.1), "comparison": None, "still_improving": 0, "seeds": 1}]
    table = format_table(rows, 0.125)
    assert "75.0 ± 1.0" in table and "+25.0 [+20.0, +30.0]" in table and "(headline)" in table and "12.5 %" in table


@pytest.mark.slow
def test_demo_end_to_end_writes_the_evidence_table(tmp_path):
    from hclafter.apps.demo import run_demo

    started = time.time()
    results = run_demo(tmp_path, device="cpu", progress=False, seeds=1, world="clean")
    assert [r["key"] for r in results["rows"]] == list(METHODS)
    assert all((r["comparison"] is None) == (r["key"] == "hybrid") for r in results["rows"])
    assert results["rows"][0]["accuracy"][0] > results["chance"]  # the shipped toy CLIP is aligned
    for name in ("report.md", "results.json", "plots/accuracy.png", "plots/world_samples.png",
                 "runs/clean/hybrid/seed0/summary.json", "runs/clean/lafter_adapter/seed0/predictions_val.csv"):
        assert (tmp_path / name).is_file(), name
    assert "verdict" in (tmp_path / "report.md").read_text()
    print(f"demo took {time.time() - started:.0f}s")


@pytest.mark.slow
def test_toy_clip_training_script_reproduces_the_shipped_zeroshot_accuracy(tmp_path):
    """Re-runs scripts/train_toy_clip.py with the shipped seed (about 5 minutes on 2 CPU cores)."""
    import subprocess
    import sys

    subprocess.run([sys.executable, str(ROOT / "scripts" / "train_toy_clip.py"), "--out", str(tmp_path)], check=True)
    info = json.loads((tmp_path / "training.json").read_text())
    shipped = json.loads((toy_clip_dir() / "training.json").read_text())
    assert info["seed"] == shipped["seed"]
    # retrained for 500 steps: another CPU's rounding moves the weights, hence the README's 2 points
    assert info["wild_test_zeroshot"]["accuracy"] == pytest.approx(TOY_CLIP_ZEROSHOT_ACCURACY, abs=0.02)
