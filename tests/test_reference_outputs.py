"""Reference outputs stored before the code was reorganised: every training method config's
logits on fixed inputs, and the summary.json of tiny training runs. A refactoring must keep them
bit-identical on the same machine.

Regenerate (only when a change of numbers is intended, and say so in the commit):
``python -m tests.test_reference_outputs``.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hclafter.models.backbone import backbone_from_config
from hclafter.core.config import load_config
from hclafter.core.emotions import MIKELS8
from hclafter.model import build_model
from hclafter.engine.run import train_run

from .conftest import ROOT, TINY_CONFIG

DATA = Path(__file__).parent / "data"
LOGITS = DATA / "reference_logits.safetensors"
SUMMARY = DATA / "reference_summary.json"
METHODS = sorted(p for p in (ROOT / "configs" / "methods").glob("*.yaml") if "mode:" not in p.read_text())
SHORT = ["data.synthetic.per_class=12", "text.steps=50"]
# Tiny runs covering the loop's paths: every phase kind of the hybrid; LaFTer's label-free
# pseudo-labels; the feature cache (no prompts, encoder frozen).
RUNS = {
    "hybrid": ([], ["train.phases=[{epochs: 1, train: [stage_adapters, fusion]}, {epochs: 1, train: "
                    "[stage_adapters, fusion, nga, prompts, layernorms, classifier], consistency: true}]"]),
    "lafter_pseudo": (["lafter_pseudo.yaml"], ["train.phases=[{epochs: 2, train: [prompts, layernorms, classifier]}]"]),
    "cached": ([], ["model.prompt_tokens=0", "train.phases=[{epochs: 2, train: [stage_adapters, fusion, nga]}]"]),
}


def method_logits() -> dict[str, torch.Tensor]:
    """Fused and per-stage logits of each method's freshly built model (seeded) on seeded inputs."""
    out = {}
    for path in METHODS:
        cfg = load_config([TINY_CONFIG, path])
        backbone = backbone_from_config(cfg.backbone)
        torch.manual_seed(0)
        embeddings = torch.randn(8, backbone.model.visual.output_dim)
        model = build_model(backbone, 8, cfg.model, class_embeddings=embeddings, class_names=MIKELS8.classes).eval()
        images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            result = model(images, return_stages=True)
        out[f"{path.stem}.logits"] = result.logits.contiguous()
        out[f"{path.stem}.stage_logits"] = result.stage_logits.contiguous()
    return out


def run_summaries(out_dir: Path, cache_dir: Path) -> dict[str, dict]:
    out = {}
    for name, (methods, overrides) in RUNS.items():
        cfg = load_config([TINY_CONFIG, *(ROOT / "configs" / "methods" / m for m in methods)],
                          [*SHORT, *overrides, f"cache_dir={cache_dir}"])
        out[name] = train_run(cfg, out_dir / name, progress=False)
        assert out[name] == json.loads((out_dir / name / "summary.json").read_text(encoding="utf-8"))
    return out


def test_method_logits_equal_the_stored_reference():
    stored = load_file(LOGITS)
    now = method_logits()
    assert set(stored) <= set(now)  # method configs added later have no reference
    for key, value in stored.items():
        assert torch.equal(now[key], value), key


def summaries_in_fresh_process(out_dir: Path) -> dict:
    """The runs in a new interpreter: CPU kernels may round differently with the memory layout a
    process's history leaves (last-bit differences), so the reference is made and checked alike."""
    out = out_dir / "summaries.json"
    subprocess.run([sys.executable, "-m", "tests.test_reference_outputs", "--summaries", str(out)], cwd=ROOT,
                   check=True, capture_output=True)
    return json.loads(out.read_text(encoding="utf-8"))


def test_tiny_training_run_summaries_equal_the_stored_reference(tmp_path):
    assert summaries_in_fresh_process(tmp_path) == json.loads(SUMMARY.read_text(encoding="utf-8"))


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        if sys.argv[1:2] == ["--summaries"]:
            summaries = json.dumps(run_summaries(Path(tmp), Path(tmp) / "cache"), indent=2) + "\n"
            Path(sys.argv[2]).write_text(summaries, encoding="utf-8")
        else:
            DATA.mkdir(exist_ok=True)
            save_file(method_logits(), LOGITS)
            SUMMARY.write_text(json.dumps(summaries_in_fresh_process(Path(tmp)), indent=2) + "\n", encoding="utf-8")
            print(f"wrote {LOGITS} and {SUMMARY}")
