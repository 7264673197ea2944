import math

import pytest
import torch

from hclafter.engine.evaluation import count_gflops
from hclafter.model import NGA, HybridCascadeLaFTer

from .conftest import tiny_tower_flops


def test_nga_weights_match_the_spec():
    # w_k = exp(-(n-k)^2 / 2): exp(-4.5), exp(-2), exp(-0.5) = 0.011109, 0.135335, 0.606531; sum 0.752975
    w = NGA(3, init_sigma=1.0).weights()
    assert torch.allclose(w, torch.tensor([0.0148, 0.1797, 0.8055]), atol=1e-4)
    # two layers: exp(-2), exp(-0.5) -> 0.1824, 0.8176
    assert torch.allclose(NGA(2).weights(), torch.tensor([0.1824, 0.8176]), atol=1e-4)
    assert NGA(1).weights().tolist() == [1.0]


def test_nga_aggregates_features_with_its_weights():
    nga = NGA(3, init_sigma=2.0)
    feats = torch.randn(3, 4, 5)
    w = [math.exp(-(3 - k) ** 2 / 8) for k in range(3)]
    expected = sum(wk * feats[k] for k, wk in enumerate(w)) / sum(w)
    assert torch.allclose(nga(feats), expected, atol=1e-6)


def test_final_layer_feature_equals_open_clip_encode_image(vitb32):
    model = HybridCascadeLaFTer(vitb32, 8, prompt_tokens=0, stages=[[12]], stage_adapters=False)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        features = model.layer_features(images)
        reference = vitb32.model.encode_image(images)
    assert features.shape == (1, 2, 512)
    assert torch.allclose(features[-1], reference, atol=1e-5)


def test_layer_features_shape_and_prompt_init(tiny_backbone):
    model = HybridCascadeLaFTer(tiny_backbone, 8, prompt_tokens=5)
    assert model.extraction_layers == [5, 6, 7, 8, 9, 10, 11, 12]
    assert model.layer_features(torch.randn(3, 3, 32, 32)).shape == (8, 3, 32)
    # v = sqrt(6 / (3 * 8^2 + 32)) for patch size 8, width 32
    bound = math.sqrt(6 / (3 * 64 + 32))
    assert model.prompts.tokens.abs().max() <= bound
    assert model.prompts.tokens.abs().max() > 0.5 * bound


def test_prompts_sit_between_cls_and_patches(tiny_backbone):
    model = HybridCascadeLaFTer(tiny_backbone, 8, prompt_tokens=4)
    x = torch.randn(2, 1 + 16, 32)
    out = model.prompts(x)
    assert out.shape == (2, 1 + 4 + 16, 32)
    assert torch.equal(out[:, 0], x[:, 0])
    assert torch.equal(out[:, 1:5], model.prompts.tokens.expand(2, -1, -1))
    assert torch.equal(out[:, 5:], x[:, 1:])


def test_adapters_at_init_equal_the_no_adapter_model(tiny_backbone):
    torch.manual_seed(0)
    with_adapters = HybridCascadeLaFTer(tiny_backbone, 8, prompt_tokens=4, stage_adapters=True)
    without = HybridCascadeLaFTer(tiny_backbone, 8, prompt_tokens=4, stage_adapters=False)
    without.load_state_dict(with_adapters.state_dict(), strict=False)
    images = torch.randn(3, 3, 32, 32)
    a, b = with_adapters.forward_stages(images), without.forward_stages(images)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.stage_logits, b.stage_logits)
    # with trained adapters the outputs differ, so the comparison above is not vacuous
    torch.nn.init.normal_(with_adapters.adapters[0].fc2.weight)
    assert not torch.allclose(with_adapters(images), without(images))


def test_forward_fuses_stage_logits_with_softmax_weights(tiny_backbone):
    model = HybridCascadeLaFTer(tiny_backbone, 8, prompt_tokens=0)
    with torch.no_grad():
        model.fusion.beta.copy_(torch.tensor([0.0, 1.0, 2.0]))
    out = model.forward_stages(torch.randn(2, 3, 32, 32))
    w = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0)
    assert out.stage_logits.shape == (3, 2, 8)
    assert torch.allclose(out.logits, (w[:, None, None] * out.stage_logits).sum(0), atol=1e-6)


def test_classifier_normalises_features_unless_legacy(tiny_backbone):
    model = HybridCascadeLaFTer(tiny_backbone, 8, prompt_tokens=0, stages=[[12]], stage_adapters=False)
    legacy = HybridCascadeLaFTer(tiny_backbone, 8, prompt_tokens=0, stages=[[12]], stage_adapters=False,
                                 normalize_features=False)
    legacy.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 32, 32)
    f = model.layer_features(images)[-1]
    weight = model.classifier.linear.weight
    assert torch.allclose(model(images), (f / f.norm(dim=-1, keepdim=True)) @ weight.T, atol=1e-5)
    assert torch.allclose(legacy(images), f @ weight.T, atol=1e-5)


def test_stages_work_for_any_depth_and_reject_missing_layers(tiny_backbone):
    model = HybridCascadeLaFTer(tiny_backbone, 6, prompt_tokens=0, stages=[[1, 3], [2, 12]])
    assert model.extraction_layers == [1, 2, 3, 12]
    assert model.forward_stages(torch.randn(1, 3, 32, 32)).stage_logits.shape == (2, 1, 6)
    with pytest.raises(ValueError, match=r"model.stages\[1\].*1\.\.12"):
        HybridCascadeLaFTer(tiny_backbone, 6, stages=[[5], [11, 13]])


def test_adapter_parameter_count_matches_the_seed(vitb32):
    model = HybridCascadeLaFTer(vitb32, 8)
    n = sum(p.numel() for p in model.adapters.parameters())
    assert n == 3 * (2 * 512 * 512 + 2 * 512)  # ≈ 1.57M


def test_flop_count_includes_attention_in_eval_mode(tiny_backbone):
    """Counted GFLOPs of the image tower equal the hand count: patch conv, per block QKV, QKᵀ and AV,
    out-projection, MLP; then the final projection. The eval-mode fused attention must be counted."""
    model = tiny_backbone.model.eval()
    hand = tiny_tower_flops()
    assert count_gflops(model.encode_image, torch.randn(1, 3, 32, 32)) * 1e9 == pytest.approx(hand, rel=1e-12)
    assert torch.backends.mha.get_fastpath_enabled()  # restored after counting
