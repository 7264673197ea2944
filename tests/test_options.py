"""The options beyond the seed (SPEC §10): input-adaptive fusion and cross-stage attention start as
the seed's model; stage distillation against hand-computed values; the options run end to end."""
import math

import pytest
import torch
import torch.nn.functional as F

from hclafter.core.config import ConfigError, ModelConfig, load_config
from hclafter.models.losses import stage_distillation_loss
from hclafter.models import HybridCascadeLaFTer, build_model
from hclafter.engine.run import train_run

from .conftest import ROOT, TINY_CONFIG

IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _with_options(tiny_backbone, **options):
    static = HybridCascadeLaFTer(tiny_backbone, 8, prompt_tokens=4).eval()
    model = HybridCascadeLaFTer(tiny_backbone, 8, prompt_tokens=4, **options).eval()
    missing, unexpected = model.load_state_dict(static.state_dict(), strict=False)
    assert not unexpected and missing  # the option's own parameters keep their initialisation
    return static, model


def test_adaptive_fusion_starts_at_the_static_weights(tiny_backbone):
    static, adaptive = _with_options(tiny_backbone, fusion="adaptive")
    with torch.no_grad():
        a, b = static(IMAGES, return_stages=True), adaptive(IMAGES, return_stages=True)
    assert torch.allclose(a.logits, b.logits, atol=1e-6) and torch.equal(a.stage_logits, b.stage_logits)
    assert a.fusion_weights is None and torch.allclose(b.fusion_weights, torch.full((3, 3), 1 / 3))
    with torch.no_grad():  # once the gate learns, the weights depend on the image
        adaptive.fusion.gate.weight.normal_()
        weights = adaptive(IMAGES, return_stages=True).fusion_weights
    assert torch.allclose(weights.sum(1), torch.ones(3)) and not torch.allclose(weights[0], weights[1])


def test_cross_stage_attention_starts_as_the_identity_and_then_mixes(tiny_backbone):
    plain, mixed = _with_options(tiny_backbone, stage_mixer="attention", mixer_heads=2)
    with torch.no_grad():
        assert torch.allclose(plain(IMAGES), mixed(IMAGES), atol=1e-6)
        mixed.mixer.attention.out_proj.weight.normal_()
        assert not torch.allclose(plain(IMAGES), mixed(IMAGES), atol=1e-4)
    with pytest.raises(ValueError, match="mixer_heads = 3 must divide"):
        HybridCascadeLaFTer(tiny_backbone, 8, stage_mixer="attention", mixer_heads=3)


def test_stage_distillation_loss_by_hand():
    stage = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])  # two stages, one image, two classes
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # p = (0.75, 0.25) at T = 1
    # KL(t ‖ s1) with s1 = (0.5, 0.5): 0.75 ln 1.5 + 0.25 ln 0.5; KL(t ‖ s2) = 0 (the same distribution).
    expected = (0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2
    assert stage_distillation_loss(stage, teacher, 1.0).item() == pytest.approx(expected, rel=1e-6)
    # At T = 2 the targets soften to softmax(z / 2) and the loss is scaled by T².
    t2, s2 = F.softmax(teacher / 2, -1), F.softmax(stage[0] / 2, -1)
    by_hand = 4 * (t2 * (t2.log() - s2.log())).sum() / 2
    assert stage_distillation_loss(stage, teacher, 2.0).item() == pytest.approx(by_hand.item(), rel=1e-5)
    # the stages learn from this term and the teacher is never trained through it
    student, grad_target = stage.clone().requires_grad_(), teacher.clone().requires_grad_()
    stage_distillation_loss(student, grad_target, 2.0).backward()
    assert grad_target.grad is None and student.grad is not None and student.grad[0].abs().sum() > 0


def test_option_configs_validate_and_build(tiny_backbone):
    methods = ROOT / "configs" / "methods"
    for name, check in (("hybrid_adaptive", lambda m: m.fusion.gate is not None),
                        ("hybrid_mixer", lambda m: m.mixer is not None),
                        ("hybrid_distill", lambda m: m.mixer is None)):
        cfg = load_config([TINY_CONFIG, methods / f"{name}.yaml"], ["model.mixer_heads=2"])
        assert check(build_model(tiny_backbone, 8, cfg.model))
    with pytest.raises(ConfigError, match="model.fusion"):
        load_config([TINY_CONFIG], ["model.fusion=learned"])
    assert "mixer" not in HybridCascadeLaFTer.trainable_groups(ModelConfig(), 12)


def test_options_run_end_to_end_and_log_their_parts(tmp_path, cache_dir):
    short = ["data.synthetic.per_class=8", "text.steps=20", "model.mixer_heads=2", f"cache_dir={cache_dir}",
             "train.phases=[{epochs: 1, train: [stage_adapters, fusion, mixer, classifier]}]"]
    adaptive = train_run(load_config([TINY_CONFIG], [*short, "model.fusion=adaptive", "model.stage_mixer=attention",
                                                     "train.distill.teacher=fused"]), tmp_path / "a", progress=False)
    weights = adaptive["image_fusion_weights"]
    assert len(weights["mean"]) == 3 and sum(weights["mean"]) == pytest.approx(1.0) and weights["per_class"]
    record = __import__("json").loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["train_distill_loss"] > 0
    student = train_run(load_config([TINY_CONFIG], [*short, f"train.distill.teacher={tmp_path / 'a'}"]),
                        tmp_path / "b", progress=False)
    assert "image_fusion_weights" not in student and (tmp_path / "b" / "teacher_logits.safetensors").is_file()
