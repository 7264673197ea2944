"""The step-overhead removals and the bf16 tower keep the numbers: bit for bit where the same
kernels run on the same operands (CLS taps, bf16 weights against autocast, compiled with the eager
backend); to float rounding where the arithmetic is reordered (differently shaped products), whose
last bits depend on the CPU's kernels (SPEC §12)."""
import copy

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock
from torch.profiler import profile

from hclafter.models.backbone import backbone_from_config, load_backbone
from hclafter.core.config import load_config
from hclafter.model import build_model
from hclafter.models import HybridCascadeLaFTer
from hclafter.models.layers import adapt_stages
from hclafter.models.vit import cls_after_blocks
from hclafter.engine.run import train_run
from hclafter.core.runtime import Runtime
from hclafter.engine.optim import param_groups

from .conftest import ROOT, TINY_CFG, TINY_CONFIG


@pytest.fixture
def backbone():
    return load_backbone("tiny", model_cfg=TINY_CFG)  # its own copy: tests change requires_grad


def images(n=4):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def outputs_and_grads(fn, inputs, params):
    inputs = inputs.detach().requires_grad_()
    for p in params:
        p.grad = None
    out = fn(inputs)
    out.float().square().sum().backward()
    return [out.detach(), inputs.grad, *(p.grad for p in params)]


@pytest.mark.parametrize("cast", [False, True])
def test_sdpa_attention_equals_the_multihead_slow_path(backbone, cast):
    block = backbone.model.visual.transformer.resblocks[3].train()
    params = list(block.ln_1.parameters())
    tokens = torch.randn(4, 30, 32)
    original = lambda x: x + block.ls_1(ResidualAttentionBlock.attention(block, block.ln_1(x)))
    ours = lambda x: x + block.ls_1(block.attention(block.ln_1(x)))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
        expected, got = outputs_and_grads(original, tokens, params), outputs_and_grads(ours, tokens, params)
    # The projections run on [B·T, W] instead of [T·B, W] tokens: equal here, but another CPU's GEMM may
    # round the last bit differently (vit.py sees it on large towers); under autocast that bit can
    # flip a bf16 rounding (2⁻⁸ relative). A wrong head split or scale moves them by O(1).
    tolerance = {"rtol": 1.6e-2, "atol": 1e-2} if cast else {"rtol": 1e-5, "atol": 1e-5}
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, **tolerance)
    with profile() as prof, torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
        ours(tokens)
    names = {e.name for e in prof.events()}
    assert "aten::scaled_dot_product_attention" in names and "aten::bmm" not in names  # one QKV product


def test_inference_keeps_the_fused_path(backbone):
    block = backbone.model.visual.transformer.resblocks[0].eval()
    with torch.no_grad(), profile() as prof:
        block(torch.randn(2, 30, 32))
    assert "aten::_native_multi_head_attention" in {e.name for e in prof.events()}


def test_cls_taps_give_the_indexing_gradients_without_zero_filled_ones(backbone):
    visual = backbone.model.visual.train()
    for p in visual.parameters():
        p.requires_grad_(False)
    params = [p for m in visual.transformer.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    tokens = torch.randn(4, 17, 32)
    layers = [5, 6, 7, 8, 9, 10, 11, 12]

    def indexing(x):
        out = []
        for i, block in enumerate(visual.transformer.resblocks[:12]):
            x = block(x)
            if i + 1 in layers:
                out.append(x[:, 0].clone())
        return torch.stack(out)

    expected = outputs_and_grads(indexing, tokens, params)
    got = outputs_and_grads(lambda x: cls_after_blocks(visual, x, layers), tokens, params)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    x = tokens.detach().requires_grad_()
    loss = cls_after_blocks(visual, x, layers).square().sum()
    with profile() as prof:
        loss.backward()
    # only the last layer's CLS gradient is a full [B, T, W] tensor (nothing runs after it)
    assert sum(e.name == "aten::select_backward" for e in prof.events()) == 1


def test_batched_stage_adapters_equal_the_stage_by_stage_ones(backbone):
    torch.manual_seed(0)
    model = HybridCascadeLaFTer(backbone, 8, prompt_tokens=0)
    for adapter in model.adapters:
        torch.nn.init.normal_(adapter.fc2.weight, std=0.1)
    params = list(model.adapters.parameters())
    z = torch.randn(3, 5, 32)
    stage_by_stage = lambda x: torch.stack([a(x[s]) for s, a in enumerate(model.adapters)])
    expected = outputs_and_grads(stage_by_stage, z, params)
    got = outputs_and_grads(lambda x: adapt_stages(model.adapters, x), z, params)
    # baddbmm over the stacked weights sums in another order than each adapter's addmm: values and
    # gradients up to 11 differ by ≤ 1.9e-6 here (2 ulps); a wrong stage or a transposed weight: O(0.1).
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


# The methods that read the tower differently (the hybrid's variants read it as the hybrid does).
METHODS = [ROOT / "configs" / "methods" / f"{name}.yaml" for name in ("hybrid", "segmented", "cascadeclip")]


@pytest.mark.parametrize("method", METHODS, ids=lambda p: p.stem)
def test_bf16_tower_weights_give_exactly_the_autocast_results(method):
    cfg = load_config([TINY_CONFIG, method])
    backbone = backbone_from_config(cfg.backbone)
    torch.manual_seed(0)
    model = build_model(backbone, 8, cfg.model, class_embeddings=torch.randn(8, 64))
    lowered = copy.deepcopy(model)
    trained = list(param_groups(lowered)["prompts"].values())
    Runtime("cpu", "bf16").lower_frozen(lowered, trained)
    dtypes = {n: p.dtype for n, p in lowered.named_parameters()}
    assert dtypes["visual.transformer.resblocks.0.mlp.c_fc.weight"] == torch.bfloat16
    assert dtypes["visual.ln_post.weight"] == torch.float32  # LayerNorms stay fp32
    assert all(dtypes[n] == torch.float32 for n in dtypes if not n.startswith("visual."))  # prompts, head
    for mode in ("eval", "train"):
        outs = []
        for m in (model, lowered):
            getattr(m, mode)()
            with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
                outs.append(m(images(), return_stages=True))
        assert torch.equal(outs[0].logits, outs[1].logits) and torch.equal(outs[0].stage_logits, outs[1].stage_logits)
    Runtime("cpu", "fp32").lower_frozen(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_compiled_training_steps_give_the_eager_run(tmp_path, cache_dir):
    short = ["data.synthetic.per_class=8", "text.steps=30", f"cache_dir={cache_dir}",
             "train.phases=[{epochs: 1, train: [stage_adapters, prompts, layernorms]}]"]
    eager = train_run(load_config([TINY_CONFIG], short), tmp_path / "eager", progress=False)
    compiled = train_run(load_config([TINY_CONFIG], [*short, "train.compile=eager"]), tmp_path / "compiled",
                         progress=False)
    assert compiled == eager
