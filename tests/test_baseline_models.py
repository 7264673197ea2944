"""The segmented and Cascade-CLIP baselines on the tiny random backbone (12 blocks, W = D = 32, 16 patches)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hclafter.models import CascadeCLIPClassifier
from hclafter.core.config import ModelConfig
from hclafter.model import HybridCascadeLaFTer, build_model
from hclafter.models import SegmentedLaFTer
from hclafter.engine.optim import param_groups

C = 8
SEGMENTS = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11], [12]]


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def text() -> torch.Tensor:
    return torch.randn(C, 32, generator=torch.Generator().manual_seed(1))


def backward_reaches(model, images, prefixes) -> None:
    model.forward_stages(images).logits.logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.zero_grad(set_to_none=True)  # the tower is shared with other tests


def test_segmented_shapes_and_growing_sequence(tiny_backbone, images):
    model = SegmentedLaFTer(tiny_backbone, C)
    seen = {}
    blocks = model.visual.transformer.resblocks
    hooks = [blocks[stage[0] - 1].register_forward_pre_hook(lambda _m, args, s=s: seen.__setitem__(s, args[0].shape[1]))
             for s, stage in enumerate(SEGMENTS)]
    try:
        out = model.forward_stages(images)
    finally:
        for h in hooks:
            h.remove()
    assert out.logits.shape == (2, C) and out.stage_logits.shape == (4, 2, C)
    assert [seen[s] for s in range(4)] == [1 + 16 + 16, 1 + 32 + 16, 1 + 48 + 16, 1 + 64 + 16]
    assert model.extraction_layers == list(range(1, 13)) and model.stages == SEGMENTS
    assert torch.allclose(model(images), out.logits)
    assert len(model.nga_weights()) == 4 and model.fusion_weights() == pytest.approx([0.25] * 4)


def test_segmented_projections_start_as_the_towers(tiny_backbone, images):
    """With no prompts, a last stage [12] gives exactly open_clip's image embedding."""
    model = SegmentedLaFTer(tiny_backbone, C, stages=[list(range(1, 12)), [12]], stage_prompt_tokens=0).eval()
    with torch.no_grad():
        final = model.forward_features(images)[-1]
        assert torch.allclose(final, tiny_backbone.model.encode_image(images), atol=1e-5)


def test_segmented_groups_and_stages(tiny_backbone, images):
    model = SegmentedLaFTer(tiny_backbone, C, stages=[[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
    groups = param_groups(model)
    assert sorted(groups["projections"]) == ["projections.0.0.bias", "projections.0.0.weight", "projections.0.1.weight",
                                             "projections.1.0.bias", "projections.1.0.weight", "projections.1.1.weight"]
    assert sorted(groups["prompts"]) == ["prompts.0.tokens", "prompts.1.tokens"]
    assert list(groups["classifier"]) == ["classifier.linear.weight"] and not groups["decoders"]
    assert groups["layernorms"] and groups["backbone"]
    stage_of = {name: model.stage_of_parameter(name) for name, _ in model.named_parameters()}
    for s in (1, 2):
        assert {n.split(".")[0] for n, st in stage_of.items() if st == s} == {"prompts", "nga", "projections"}
    assert all(stage_of[n] is None for n in stage_of if n.startswith(("classifier", "fusion", "visual")))
    backward_reaches(model, images, ("prompts", "projections", "nga", "classifier", "fusion"))


@pytest.mark.parametrize("stages", [[[5, 6, 7], [8, 9], [10, 11, 12]], [[1, 2], [4, 3], list(range(5, 13))],
                                    [list(range(1, 13)), []], [list(range(1, 14))]])
def test_segmented_rejects_bad_stages(tiny_backbone, stages):
    with pytest.raises(ValueError, match=r"model\.stages"):
        SegmentedLaFTer(tiny_backbone, C, stages=stages)


def test_cascadeclip_structure_and_sum(tiny_backbone, images, text):
    model = CascadeCLIPClassifier(tiny_backbone, C, text, decoder_heads=4, prompt_tokens=5)
    assert not hasattr(model, "classifier") and model.fusion_weights() is None
    assert model.extraction_layers == [6, 7, 8, 9, 10, 11, 12]
    assert [sorted(p) for p in model.projections] == [["6", "7", "8"], ["10", "11", "9"], []]
    ln, linear = model.projections[0]["6"]
    assert torch.equal(ln.weight, model.visual.ln_post.weight) and torch.equal(linear.weight, model.visual.proj.T)
    weights = model.nga_weights()
    assert weights[0] == pytest.approx([0.1353, 0.6065, 1.0], abs=1e-4) and weights[1] == weights[0]
    assert weights[2] == [1.0]
    assert len(model.decoders) == 3 and len(model.decoders[0].layers) == 2
    out = model.forward_stages(images)
    assert out.logits.shape == (2, C) and out.stage_logits.shape == (3, 2, C)
    assert torch.allclose(out.logits, out.stage_logits.sum(0), atol=1e-6)


def test_cascadeclip_groups_and_gradients(tiny_backbone, images, text):
    model = CascadeCLIPClassifier(tiny_backbone, C, text, stages=[[9, 10, 11], [12]], decoder_layers=2,
                                  decoder_heads=8, prompt_tokens=3)
    groups = param_groups(model)
    assert not groups["classifier"] and not groups["fusion"] and not groups["stage_adapters"]
    assert groups["decoders"] and groups["projections"] and list(groups["prompts"]) == ["prompts.tokens"]
    assert not groups["nga"] and sorted(groups["layer_weights"]) == ["nga.0", "nga.1"]
    assert model.stage_of_parameter("decoders.1.score.q.weight") == 2
    assert model.stage_of_parameter("queries.0.weight") == 1 and model.stage_of_parameter("nga.1") == 2
    assert model.stage_of_parameter("projections.0.9.1.weight") == 1
    assert model.stage_of_parameter("prompts.tokens") is None and model.stage_of_parameter("visual.proj") is None
    backward_reaches(model, images, ("prompts", "projections", "nga", "queries", "decoders"))


def test_cascadeclip_rejects_bad_inputs(tiny_backbone, text):
    with pytest.raises(ValueError, match=r"model\.stages\[1\]"):
        CascadeCLIPClassifier(tiny_backbone, C, text, stages=[[6, 7], [13]])
    with pytest.raises(ValueError, match="class_embeddings must have shape"):
        CascadeCLIPClassifier(tiny_backbone, C + 1, text)
    with pytest.raises(ValueError, match="decoder_heads"):
        CascadeCLIPClassifier(tiny_backbone, C, text, decoder_heads=5)


def test_build_model_dispatch(tiny_backbone, text):
    assert isinstance(build_model(tiny_backbone, C, ModelConfig()), HybridCascadeLaFTer)
    segmented = build_model(tiny_backbone, C, ModelConfig(method="segmented", stages=SEGMENTS, stage_prompt_tokens=4))
    assert isinstance(segmented, SegmentedLaFTer) and segmented.prompts[0].tokens.shape == (4, 32)
    with pytest.raises(ValueError, match=r"model\.stages"):
        build_model(tiny_backbone, C, ModelConfig(method="segmented"))  # the hybrid default stages do not cover 1..12
    cfg = ModelConfig(method="cascadeclip", stages=[[6, 7, 8], [9, 10, 11], [12]], decoder_layers=1, decoder_heads=2)
    cascade = build_model(tiny_backbone, C, cfg, class_embeddings=text)
    assert isinstance(cascade, CascadeCLIPClassifier) and not cascade.decoders[0].layers
    assert torch.allclose(cascade.class_embeddings, F.normalize(text, dim=-1))
    with pytest.raises(ValueError, match="needs class_embeddings"):
        build_model(tiny_backbone, C, cfg)
    with pytest.raises(ValueError, match="model.aggregation=mean does not apply"):
        build_model(tiny_backbone, C, ModelConfig(method="cascadeclip", aggregation="mean"), class_embeddings=text)
    mean = build_model(tiny_backbone, C, ModelConfig(method="segmented", stages=SEGMENTS, aggregation="mean"))
    assert mean.nga_weights()[0] == pytest.approx([0.25] * 4) and not param_groups(mean)["nga"]
    hybrid = build_model(tiny_backbone, C, ModelConfig(aggregation="mean"))
    assert hybrid.nga_weights()[1] == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="model.method"):
        build_model(tiny_backbone, C, ModelConfig(method="nope"))
