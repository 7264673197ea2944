import torch

from hclafter.core.config import Config, load_config
from hclafter.data import load_splits, make_dataset, make_loader
from hclafter.model import HybridCascadeLaFTer, build_model
from hclafter.core.config import phase_groups
from hclafter.engine.optim import (build_optimizer, param_groups, saved_parameter_names, set_trainable, training_rounds,
                                   warmup_cosine)


def _requires_grad_by_group(groups):
    return {g: {p.requires_grad for p in params.values()} for g, params in groups.items() if params}


def test_each_phase_sets_requires_grad_exactly_as_the_schedule_says(tiny_backbone):
    cfg = Config()
    model = build_model(tiny_backbone, 8, cfg.model)
    groups = param_groups(model)
    expected = [
        {"stage_adapters", "fusion"},
        {"stage_adapters", "fusion", "nga", "prompts", "layernorms", "classifier"},
        {"stage_adapters", "fusion", "nga", "prompts", "layernorms", "classifier"},
    ]
    schedule = training_rounds(cfg.train, steps_per_epoch=5)  # a budget in epochs: one round per epoch
    assert [r.phase_no for r in schedule] == [1, 1, 1, 2, 2, 2, 3, 3]
    assert [r.phase.consistency for r in schedule] == [False] * 6 + [True] * 2
    for r, trained in zip(schedule[::3], expected):
        set_trainable(model, groups, phase_groups(r.phase, cfg.train.train_backbone))
        states = _requires_grad_by_group(groups)
        assert states == {g: {g in trained} for g in states}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {n for g in trained for n in groups[g]}


def test_parameter_groups_cover_the_model_once(tiny_backbone):
    model = build_model(tiny_backbone, 8, Config().model)
    groups = param_groups(model)
    names = [n for params in groups.values() for n in params]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert all("ln" in n for n in groups["layernorms"])
    assert len(groups["layernorms"]) == 2 * (2 + 2 * 12)  # ln_pre, ln_post, ln_1/ln_2 per block; weight + bias
    assert set(groups["nga"]) == {"nga.0.sigma", "nga.1.sigma", "nga.2.sigma"}
    assert set(groups["fusion"]) == {"fusion.beta"}
    assert set(groups["prompts"]) == {"prompts.tokens"}


def test_optimizer_learning_rates_and_weight_decay(tiny_backbone):
    cfg = Config()
    model = build_model(tiny_backbone, 8, cfg.model)
    optimizer = build_optimizer(param_groups(model), cfg)
    by_group = {}
    for g in optimizer.param_groups:
        by_group.setdefault(g["group"], []).append((g["lr"], g["weight_decay"], len(g["params"])))
    assert set(by_group) == {"prompts", "layernorms", "classifier", "stage_adapters", "fusion", "nga"}
    assert by_group["nga"] == [(1e-5, 0.0, 3)]
    assert by_group["prompts"] == [(1e-4, 0.0, 1)]
    assert by_group["fusion"] == [(1e-4, 0.0, 1)]
    assert by_group["classifier"] == [(1e-4, 0.01, 1)]
    assert all(wd == 0.0 for _, wd, _ in by_group["layernorms"])
    # adapters: weights decayed, biases not
    assert sorted(by_group["stage_adapters"]) == [(1e-4, 0.0, 6), (1e-4, 0.01, 6)]


def test_train_backbone_adds_the_tower_to_training_and_saving(tiny_backbone):
    cfg = load_config([], ["train.train_backbone=true"])
    model = build_model(tiny_backbone, 8, cfg.model)
    assert "visual.conv1.weight" in param_groups(model)["backbone"]
    assert "backbone" not in phase_groups(cfg.train.phases[0], True)
    assert "backbone" in phase_groups(cfg.train.phases[1], True)
    saved = saved_parameter_names(model, cfg)
    assert "visual.conv1.weight" in saved
    plain = saved_parameter_names(model, Config())
    assert "visual.conv1.weight" not in plain and "visual.ln_post.weight" in plain
    assert "classifier.linear.weight" in plain and not any(n.startswith("transformer.") for n in plain)


def test_warmup_then_cosine():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # warm-up 0.5, 1.0; then 0.5*(1+cos(pi*k/4)) for k = 0..3
    assert [round(x, 4) for x in lrs] == [0.5, 1.0, 1.0, 0.8536, 0.5, 0.1464]


def test_shuffled_loader_pairs_every_image_with_its_own_distribution(tiny_backbone, cache_dir):
    cfg = load_config([], ["data.synthetic.per_class=6", "data.synthetic.image_size=32",
                           "data.distribution.source=dataset"])
    data = load_splits(cfg.data, 0, cache_dir)
    samples = data["train"]
    assert len({s.distribution for s in samples}) > len(samples) // 2  # distributions are per image
    dataset = make_dataset(samples, data.wheel, tiny_backbone.preprocess, cfg.data)
    loader = make_loader(dataset, batch_size=5, shuffle=True, seed=3)
    seen, positions_differ = [], False
    for b, batch in enumerate(loader):
        for j, index in enumerate(batch["index"].tolist()):
            sample = samples[index]
            assert torch.allclose(batch["distribution"][j], torch.tensor(sample.distribution), atol=1e-6)
            assert batch["label"][j].item() == sample.label
            assert torch.equal(batch["image"][j], dataset[index]["image"])
            positions_differ |= index != b * 5 + j
            seen.append(index)
    assert sorted(seen) == list(range(len(samples)))
    assert positions_differ  # the loader really shuffled: a position-based lookup would be wrong


def test_vitb32_one_training_step_with_50_prompts(vitb32):
    cfg = Config()
    model = HybridCascadeLaFTer(vitb32, 8, prompt_tokens=50)
    groups = param_groups(model)
    set_trainable(model, groups, phase_groups(cfg.train.phases[-1], False))
    optimizer = build_optimizer(groups, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model.forward_stages(torch.randn(2, 3, 224, 224))
    assert out.logits.shape == (2, 8) and out.stage_logits.shape == (3, 2, 8)
    out.logits.logsumexp(-1).mean().backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "prompts.tokens" in changed and "visual.ln_pre.weight" in changed and "classifier.linear.weight" in changed
    assert "visual.conv1.weight" not in changed and "visual.transformer.resblocks.0.attn.in_proj_weight" not in changed
