"""Hugging Face directory and ONNX export of a trained run, and the ONNX latency bench."""
import json
import math
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import hclafter
from hclafter.models.backbone import load_backbone
from hclafter.apps.cli import main
from hclafter.core.config import load_config
from hclafter.apps.export import ExportError, write_onnx
from hclafter.data.images import load_rgb

from .conftest import TINY_CFG, TINY_CONFIG
from .tiny_runs import train_tiny

onnxruntime = pytest.importorskip("onnxruntime", reason="needs hclafter[onnx]")


def _weights_file(path, init_seed):
    """The tiny config's backbone at one random init, as a weights file (a stand-in for ViT-B-32.pt)."""
    cfg = load_config([TINY_CONFIG]).backbone
    backbone = load_backbone(cfg.name, model_cfg=cfg.model_cfg, init_seed=init_seed)
    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return _weights_file(tmp_path_factory.mktemp("clip") / "tiny-clip.safetensors", init_seed=3)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir, weights):
    return train_tiny(tmp_path_factory.mktemp("runs") / "seed0", cache_dir, f"backbone.pretrained={weights}",
                      "backbone.random_init=false")


@pytest.fixture(scope="module")
def test_images(run_dir):
    return [line.split(",")[0] for line in (run_dir / "splits" / "test.csv").read_text().splitlines()[1:9]]


@pytest.fixture(scope="module")
def hf_dir(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "model"
    assert main(["export", str(run_dir), "--format", "hf", str(out)]) == 0
    return out


def _keys(path):
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def test_hf_directory_predicts_exactly_like_the_run(hf_dir, run_dir, weights, test_images):
    assert {p.name for p in hf_dir.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    keys = _keys(hf_dir / "model.safetensors")
    assert "prompts.tokens" in keys and "classifier.linear.weight" in keys and "fusion.beta" in keys
    assert "visual.ln_post.weight" in keys  # tuned LayerNorms of the tower travel with the model
    assert "visual.conv1.weight" not in keys and "visual.transformer.resblocks.0.attn.in_proj_weight" not in keys
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["backbone"]["identity"] == json.loads((run_dir / "run.json").read_text())["backbone"]
    assert str(weights.parent) not in (hf_dir / "config.json").read_text()  # no local paths in a publishable file

    model = hclafter.from_pretrained(hf_dir, backbone_weights=str(weights))
    run = hclafter.load_run(run_dir)
    got, expected = model.predict(test_images), run.predict(test_images)
    assert np.abs(got.distributions - expected.distributions).max() <= 1e-6
    assert got.labels == expected.labels and got.classes == expected.classes
    assert model.fusion_weights() == pytest.approx(run.model.fusion_weights(), abs=1e-7)


def test_model_card_reports_seeds_data_and_limits(hf_dir, run_dir):
    card = (hf_dir / "README.md").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert card.startswith("---\nlibrary_name: hclafter\npipeline_tag: image-classification\n")
    assert f"| 0 (these weights) | {100 * summary['test']['accuracy']:.2f} |" in card
    assert f"{summary['num_samples']['train']} training" in card
    for section in ("## Results (test split)", "## Training data", "## Intended use", "## Limitations"):
        assert section in card
    assert "These numbers say nothing about photographs" in card


def test_model_card_of_a_sweep_run_lists_every_seed(run_dir, tmp_path):
    """A run of a sweep (``.../seedN``) reports its sibling seeds and their mean ± std."""
    from hclafter.apps.export import hf_config, model_card

    sibling = run_dir.parent / "seed1"
    sibling.mkdir(exist_ok=True)
    (sibling / "config.yaml").write_text("seed: 1\n")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["test"]["accuracy"] = 0.5
    (sibling / "summary.json").write_text(json.dumps(summary))
    try:
        card = model_card(hf_config(hclafter.load_run(run_dir), include_backbone=False))
    finally:
        for f in sibling.iterdir():
            f.unlink()
        sibling.rmdir()
    assert "| 0 (these weights) |" in card and "| 1 | 50.00 |" in card
    assert "| mean ± std (2 seeds) |" in card


def test_missing_or_wrong_backbone_weights_are_refused(hf_dir, tmp_path):
    with pytest.raises(ExportError, match=r"tiny-clip\.safetensors \(sha256 [0-9a-f]{64}\).*--include-backbone"):
        hclafter.from_pretrained(hf_dir)
    other = _weights_file(tmp_path / "other.safetensors", init_seed=4)
    with pytest.raises(ExportError, match="has sha256 .* the model was trained with tiny-clip.safetensors"):
        hclafter.from_pretrained(hf_dir, backbone_weights=str(other))


def test_include_backbone_and_save_pretrained_round_trip(run_dir, tmp_path, test_images):
    out = tmp_path / "embedded"
    assert main(["export", str(run_dir), "--format", "hf", str(out), "--include-backbone"]) == 0
    assert "visual.conv1.weight" in _keys(out / "model.safetensors")
    model = hclafter.from_pretrained(out)  # no weights file needed
    again = tmp_path / "again"
    model.save_pretrained(again)
    assert json.loads((again / "config.json").read_text()) == json.loads((out / "config.json").read_text())
    reloaded = hclafter.from_pretrained(again)
    expected = hclafter.load_run(run_dir).predict(test_images).distributions
    for m in (model, reloaded):
        assert np.abs(m.predict(test_images).distributions - expected).max() <= 1e-6


def test_onnx_graph_matches_pytorch(run_dir, tmp_path, capsys, test_images):
    import onnx

    path = tmp_path / "model.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", str(path)]) == 0
    assert "ONNX Runtime matches PyTorch" in capsys.readouterr().out
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version >= 18
    meta = {p.key: p.value for p in proto.metadata_props}
    run = hclafter.load_run(run_dir)
    assert json.loads(meta["classes"]) == list(run.wheel.classes)
    assert json.loads(meta["preprocess"])["size"] == [32, 32]

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["probabilities", "stage_logits"]
    images = torch.stack([run.backbone.preprocess(load_rgb(p)) for p in test_images])
    for batch in (images, images[:3]):  # exported with a batch of 2: the batch axis is dynamic
        probs, stages = session.run(None, {"images": batch.numpy()})
        with torch.no_grad():
            out = run.model.forward_stages(batch)
        assert probs.shape == (len(batch), 8) and stages.shape == (3, len(batch), 8)
        assert np.abs(probs - out.logits.softmax(-1).numpy()).max() <= 1e-4
        assert np.abs(stages - out.stage_logits.numpy()).max() <= 1e-4


def test_onnx_without_the_extra_names_it(run_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    with pytest.raises(ExportError, match=r"pip install 'hclafter\[onnx\]'"):
        write_onnx(hclafter.load_run(run_dir).model, tmp_path / "m.onnx", torch.zeros(1, 3, 32, 32))
    assert main(["export", str(run_dir), "--format", "onnx", str(tmp_path / "m.onnx")]) == 2


def test_bench_onnx_latency():
    from hclafter.apps.bench import onnx_latency

    out = onnx_latency(batch=2, prompts=2, repeats=2, name="tiny", model_cfg=TINY_CFG)
    for key in ("pytorch_ms_per_image", "onnxruntime_ms_per_image", "onnxruntime_speedup"):
        assert math.isfinite(out[key]) and out[key] > 0, key
    assert out["max_abs_diff"] <= 1e-4
    assert out["onnxruntime_speedup"] == pytest.approx(out["pytorch_ms_per_image"] / out["onnxruntime_ms_per_image"])
