"""Speed, memory and FLOP benchmarks: HybridCascade-LaFTer against plain LaFTer (same backbone
and prompts), the Cascade-CLIP baseline, and a run's training step against a bare PyTorch step of
the same prompted tower, measured side by side in one process.

Single timings on a shared machine drift by ±10 % and more, so the two sides of every ratio are
interleaved and repeated, and their minima are compared: the workload is deterministic, so the
least disturbed run is the stablest estimate of its cost. How disturbed the machine was is
reported too (``timing_noise``: median / minimum − 1 of each measurement).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..core.config import Config, DataConfig, load_config, phase_groups, tuned_groups
from ..core.emotions import MIKELS8, strategy1
from ..core.runtime import DTYPES, lower_frozen, make_runtime
from ..core.timing import interleaved, timing_noise
from ..data import EmotionImages, Sample, make_loader
from ..data.store import stored_datasets
from ..engine import runfiles
from ..engine.evaluation import count_gflops
from ..engine.inference import build_run_model
from ..engine.loop import TrainState, train_step
from ..engine.optim import build_optimizer, param_groups, schedule_length, set_trainable, warmup_cosine
from ..models import CascadeCLIPClassifier, HybridCascadeLaFTer
from ..models.backbone import backbone_from_config, load_backbone
from ..models.vit import project, tap_cls


def _reference(dtype: torch.dtype, device: torch.device, flops: float) -> tuple[Callable[[], None], float]:
    """About ``flops`` FLOPs of square matrix products, at most 2048² on CPU and 8192² on GPU (a
    small model gets small ones: a 2048² bf16 product takes seconds on a CPU without bf16 units),
    and their exact FLOPs: the rate the device reaches on plain matrix arithmetic, which
    utilisation divides by."""
    size = min(8192 if device.type == "cuda" else 2048, max(64, round((flops / 2) ** (1 / 3))))
    count = max(1, round(flops / (2 * size**3)))
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def run() -> None:
        for _ in range(count):
            a @ b
    return run, 2 * size**3 * count


def training_memory_bytes(model: torch.nn.Module, images: torch.Tensor) -> int:
    """Bytes a training step keeps alive beyond the weights: tensors saved for backward, gradients
    and AdamW's two moments. Counted exactly, so the ratio does not drift with allocator noise."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:  # weights saved for backward cost nothing extra
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.forward_stages(images).logits.logsumexp(-1).mean()
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return sum(saved.values()) + 3 * sum(p.numel() * p.element_size() for p in trainable)


def _train_all_but_backbone(model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model)
    for name, params in groups.items():
        for p in params.values():
            p.requires_grad_(name != "backbone")
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def _tail(model: HybridCascadeLaFTer, block_output: torch.Tensor) -> torch.Tensor:
    """The part of an eval forward after the blocks, the only part that differs between the models:
    the CLS token read at each extraction layer as the model reads it (all from one block output
    here, at the same cost), their projection, and the head."""
    x, cls = block_output, []
    for _ in model.extraction_layers[1:]:
        x, token = tap_cls(x)
        cls.append(token)
    cls.append(x[:, 0].clone())
    return model.forward_head(project(model.visual, torch.stack(cls))).logits


def _cascade_tail(model: CascadeCLIPClassifier, block_output: torch.Tensor) -> torch.Tensor:
    """Cascade-CLIP's counterpart of ``_tail``: its projections, layer weighting and decoders."""
    return model.forward_head(({layer: block_output for layer in model.extraction_layers}, block_output)).logits


def _forward(model: torch.nn.Module, images: torch.Tensor, cast: Callable[[], Any]) -> Callable[[], None]:
    """An inference forward pass of ``model`` on ``images``."""
    def run() -> None:
        with torch.inference_mode(), cast():
            model(images)
    return run


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
          cast: Callable[[], Any]) -> Callable[[], None]:
    """A training step of ``model`` on ``images`` (the fused logits' log-sum-exp as the loss)."""
    def run() -> None:
        with cast():
            loss = model(images).float().logsumexp(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return run


def _tail_step(model: HybridCascadeLaFTer, block_output: torch.Tensor,
               optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """The part of a training step that differs between the models: the tail, its backward into the
    block outputs (one CLS gradient per extraction layer, scattered into the residual stream's
    gradient) and the update of the parameters it reaches."""
    def run() -> None:
        loss = _tail(model, block_output).float().logsumexp(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        block_output.grad = None
        loss.backward()
        optimizer.step()
    return run


def bf16_units() -> list[str]:
    """The CPU's bf16 arithmetic instructions (AMX tiles, AVX-512 BF16) from /proc/cpuinfo; without
    them bf16 matrix products run slower than fp32 ones."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("flags")), []) if cpuinfo.exists() else []
    return [f for f in ("amx_bf16", "avx512_bf16") if f in flags]


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


@dataclass
class _Pair:
    """The two models every ratio compares (same backbone, same prompts) and their inputs."""

    hybrid: HybridCascadeLaFTer
    lafter: HybridCascadeLaFTer
    images: torch.Tensor
    cast: Callable[[], Any]  # the autocast of the asked-for precision
    precision: str
    repeats: int

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def fewer(self) -> int:
        return max(1, self.repeats // 2)


def _models(device: str, batch: int, prompts: int, repeats: int, name: str, precision: str,
            model_cfg: Optional[dict]) -> tuple[_Pair, Any, CascadeCLIPClassifier]:
    """HybridCascade, LaFTer and Cascade-CLIP on one random-init tower (its frozen weights in
    ``precision``, as runs keep them), random images of the model's size, and the backbone."""
    dev = torch.device(device)
    torch.manual_seed(0)
    backbone = load_backbone(name, model_cfg=model_cfg)
    backbone.model.to(dev)
    hybrid = HybridCascadeLaFTer(backbone, 8, prompt_tokens=prompts).to(dev)
    lafter = HybridCascadeLaFTer(backbone, 8, prompt_tokens=prompts, stages=[[hybrid.visual.transformer.layers]],
                                 stage_adapters=False).to(dev)
    lafter.prompts.load_state_dict(hybrid.prompts.state_dict())
    embeddings = F.normalize(torch.randn(8, hybrid.visual.output_dim), dim=-1)
    cascade = CascadeCLIPClassifier(backbone, 8, embeddings, prompt_tokens=prompts).to(dev).eval()
    if precision != "fp32":  # one tower, shared by the three models
        lower_frozen(hybrid, DTYPES[precision])
    size = backbone.preprocess_cfg.size
    size = size if isinstance(size, int) else size[0]
    cast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    images = torch.randn(batch, 3, size, size, device=dev)
    return _Pair(hybrid, lafter, images, cast, precision, repeats), backbone, cascade


def run_bench(device: str = "cpu", batch: int = 32, prompts: int = 50, repeats: int = 5,
              name: str = "ViT-B-32", precision: str = "fp32", model_cfg: Optional[dict] = None) -> dict:
    """Every ratio of the performance targets, for ``name`` at random init (speed does not depend on
    the weights). ``precision`` (fp32, or bf16: autocast over the tower's frozen weights kept in
    bf16, as runs do) applies to the HybridCascade/LaFTer timings; inference throughput is measured
    in both precisions in the same rounds after a warm-up (their ratio and each utilisation: the
    median over rounds of the ratio within a round).

    Whole forwards and training steps are timed in ``repeats`` interleaved rounds (the training
    step, feature cache, Cascade-CLIP comparisons and the other precision in half as many). On a
    shared machine their minima still move by several per cent between runs, more than the 0.1 %
    of work the cascade adds, so the eval, training and Cascade-CLIP ratios are also given
    ``_from_parts``: the models run the same embedding and blocks and differ only in the tail
    after them (milliseconds; Cascade-CLIP's decoders: tenths of a second), which is timed in
    20 × ``repeats`` interleaved rounds (4 × for Cascade-CLIP) and added to the directly measured
    time of the other side. Last, the run's training step against a bare PyTorch step of the same
    tower, prompts and batch (``step_vs_bare``, ``repeats`` rounds)."""
    pair, backbone, cascade = _models(device, batch, prompts, repeats, name, precision, model_cfg)
    dev = pair.device
    out: dict = {"device": _device_name(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "batch": batch, "prompts": prompts, "model": name, "precision": precision, "repeats": repeats,
                 "timing_noise": {}}
    if dev.type == "cpu":
        out["cpu_bf16_units"] = bf16_units()
    seconds, start = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal start
        seconds[name], start = time.perf_counter() - start, time.perf_counter()

    _eval_ratios(pair, out)
    lap("eval")
    _train_ratios(pair, out)
    lap("train")
    with pair.cast():
        out["cache_speedup"], out["timing_noise"]["cache"] = _cache_speedup(pair.hybrid, pair.images, pair.fewer, dev)
    lap("cache")
    _cascade_ratios(pair, cascade, out)
    lap("cascadeclip")
    _bare_ratio(step_vs_bare(device, batch, prompts, repeats, name, precision, model_cfg), out)
    lap("vs_bare")
    out.update(data_rates(backbone.preprocess, backbone.preprocess_cfg, batch))
    lap("data")
    out["seconds"] = seconds  # where the bench's own time goes
    return out


def _other_precision(pair: _Pair) -> tuple[str, HybridCascadeLaFTer, Callable[[], Any]]:
    """The precision not asked for, a copy of the hybrid with its tower in it, and its autocast."""
    label = "bf16" if pair.precision == "fp32" else "fp32"
    model = copy.deepcopy(pair.hybrid)
    if label == "fp32":
        return label, model.float(), nullcontext
    lower_frozen(model, torch.bfloat16)
    return label, model, lambda: torch.autocast(pair.device.type, dtype=torch.bfloat16)


def _eval_ratios(pair: _Pair, out: dict) -> None:
    """Inference: FLOPs, time (direct and from parts), images/s, and utilisation in both precisions."""
    hybrid, lafter, images, dev, batch = pair.hybrid, pair.lafter, pair.images, pair.device, len(pair.images)
    for m in (hybrid, lafter):
        m.eval()
    with pair.cast():
        flops_h, flops_l = count_gflops(hybrid, images[:1]), count_gflops(lafter, images[:1])
    out["gflops_per_image"] = {"hybrid": flops_h, "lafter": flops_l}
    out["eval_flops_ratio"] = flops_h / flops_l
    # Both precisions' forwards and references (square matrix products, a quarter of the forward's
    # FLOPs: enough for a rate) in the same rounds, the two forwards next to each other. On a
    # shared CPU the load moves the fp32 rate alone by a factor of 3 within minutes, so ratios
    # between them are taken per round (the same moment for both) and their median is reported.
    other, other_model, other_cast = _other_precision(pair)
    reference, reference_flops = _reference(DTYPES[pair.precision], dev, batch * flops_h * 1e9 / 4)
    other_reference, other_flops = _reference(DTYPES[other], dev, batch * flops_h * 1e9 / 4)
    fns = [_forward(hybrid, images, pair.cast), _forward(other_model, images, other_cast),
           _forward(lafter, images, pair.cast), reference, other_reference]
    times = interleaved(fns, pair.repeats, dev)
    with torch.inference_mode(), pair.cast():
        block_output = hybrid.embed(images)  # [B, N, W], the shape of every block's output
        tails = interleaved([lambda: _tail(hybrid, block_output), lambda: _tail(lafter, block_output)],
                            20 * pair.repeats, dev)
    t_h, t_l = min(times[0]), min(times[2])
    out["eval_time_ratio"] = t_h / t_l
    out["eval_time_ratio_from_parts"] = 1 + (min(tails[0]) - min(tails[1])) / t_l
    out["eval_images_per_s"] = {"hybrid": batch / t_h, "lafter": batch / t_l}
    out["timing_noise"]["eval"] = timing_noise(times[:3])
    # Encoder FLOP utilisation in both precisions: images/s × FLOPs per image / matrix-product rate.
    for label, model_times, flops, ref_times in ((pair.precision, times[0], reference_flops, times[3]),
                                                 (other, times[1], other_flops, times[4])):
        out[f"{label}_matmul_gflops"] = flops / min(ref_times) / 1e9
        out[f"{label}_images_per_s"] = batch / min(model_times)
        out[f"{label}_utilisation"] = statistics.median(batch * flops_h * 1e9 * t_ref / (t * flops)
                                                        for t, t_ref in zip(model_times, ref_times))
    fp32, bf16 = (times[0], times[1]) if pair.precision == "fp32" else (times[1], times[0])
    out["bf16_over_fp32_throughput"] = statistics.median(f / b for f, b in zip(fp32, bf16))


def _train_ratios(pair: _Pair, out: dict) -> None:
    """Training: memory kept for backward, step time (direct and from parts), CUDA peak memory."""
    hybrid, lafter, images, dev, batch = pair.hybrid, pair.lafter, pair.images, pair.device, len(pair.images)
    opt_h, opt_l = _train_all_but_backbone(hybrid), _train_all_but_backbone(lafter)
    steps = [_step(hybrid, opt_h, images, pair.cast), _step(lafter, opt_l, images, pair.cast)]
    hybrid.train(), lafter.train()
    with pair.cast():  # counting the memory also warms both steps up
        mem_h, mem_l = training_memory_bytes(hybrid, images), training_memory_bytes(lafter, images)
    out["train_memory_bytes"] = {"hybrid": mem_h, "lafter": mem_l}
    out["train_memory_ratio"] = mem_h / mem_l
    times = interleaved(steps, pair.fewer, dev, warmup=0)
    s_h, s_l = min(times[0]), min(times[1])
    with torch.no_grad(), pair.cast():
        block_output = hybrid.embed(images).detach().requires_grad_()
    with pair.cast():
        tails = interleaved([_tail_step(hybrid, block_output, opt_h), _tail_step(lafter, block_output, opt_l)],
                            20 * pair.repeats, dev)
    out["train_step_ratio"] = s_h / s_l
    out["train_step_ratio_from_parts"] = 1 + (min(tails[0]) - min(tails[1])) / s_l
    out["train_images_per_s"] = {"hybrid": batch / s_h, "lafter": batch / s_l}
    out["timing_noise"]["train_step"] = timing_noise(times)
    if dev.type == "cuda":
        peaks = []
        for run in steps:
            torch.cuda.reset_peak_memory_stats(dev)
            run()
            peaks.append(torch.cuda.max_memory_allocated(dev))
        out["cuda_peak_memory_ratio"] = peaks[0] / peaks[1]


def _cascade_ratios(pair: _Pair, cascade: CascadeCLIPClassifier, out: dict) -> None:
    """The Cascade-CLIP-style baseline against the hybrid: time (direct and from parts) and FLOPs."""
    hybrid, images, dev = pair.hybrid, pair.images, pair.device
    hybrid.eval()
    with torch.inference_mode(), pair.cast():
        times = interleaved([lambda: cascade(images), lambda: hybrid(images)], pair.fewer, dev)
        block_output = hybrid.embed(images)
        # Cascade-CLIP's tail (its decoders) takes a good part of a second: fewer rounds suffice.
        tails = interleaved([lambda: _cascade_tail(cascade, block_output), lambda: _tail(hybrid, block_output)],
                            4 * pair.repeats, dev)
    t_h = len(images) / out["eval_images_per_s"]["hybrid"]
    out["cascadeclip_over_hybrid_time"] = min(times[0]) / min(times[1])
    out["cascadeclip_over_hybrid_time_from_parts"] = 1 + (min(tails[0]) - min(tails[1])) / t_h
    out["timing_noise"]["cascadeclip"] = timing_noise(times)
    with pair.cast():
        out["gflops_per_image"]["cascadeclip"] = count_gflops(cascade, images[:1])
    out["cascadeclip_over_hybrid_flops"] = out["gflops_per_image"]["cascadeclip"] / out["gflops_per_image"]["hybrid"]


# The schedule a benchmarked run step follows, in steps per epoch: it sets learning rates, never the work.
SCHEDULE_STEPS_PER_EPOCH = 1000


class BareViT(nn.Module):
    """The open_clip image tower with visual prompts and a linear head, written the plain way: patch
    embedding, class token, positions and ``ln_pre``, the prompt tokens between the class token and
    the patches (where LaFTer and the hybrid put them), the tower's own ``transformer`` (its blocks'
    attention through SDPA, as ``load_backbone`` sets every tower up), ``ln_post`` and ``proj`` of
    the final CLS token, the head. What a run's training step is measured against (``step_vs_bare``)."""

    def __init__(self, visual: nn.Module, prompts: torch.Tensor, classes: int) -> None:
        super().__init__()
        self.visual = visual
        self.prompts = nn.Parameter(prompts.detach().clone())
        self.head = nn.Linear(visual.output_dim, classes, device=prompts.device)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] → the final CLS token in the joint space: [B, D]."""
        v = self.visual
        x = v.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.to(x.dtype).expand(len(x), 1, -1), x], dim=1)
        x = v.ln_pre(x + v.positional_embedding.to(x.dtype))
        x = torch.cat([x[:, :1], self.prompts.to(x.dtype).expand(len(x), -1, -1), x[:, 1:]], dim=1)
        return v.ln_post(v.transformer(x)[:, 0]) @ v.proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def bare_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cast: Callable[[], Any],
              lr: float) -> Callable[[], None]:
    """The plain training step of ``model`` (a ``BareViT``, compiled or not): cross-entropy, backward,
    AdamW over every parameter that requires grad."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def run() -> None:
        with cast():
            loss = F.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return run


def run_step(cfg: Config, batch_size: int) -> tuple[Callable[[], dict], TrainState, dict]:
    """The hybrid's training step as a run takes it (``loop.train_step``, with ``train.compile``
    when set), its state and its batch: the run's model on a stage-1 classifier (random rows: the
    values cost nothing), its trained groups and frozen weights as ``run._prepare_training`` sets
    them, the run's AdamW groups and schedule, prepared by accelerate; the last phase of the
    schedule (every group trained, the consistency loss on); random images of the tower's size,
    labels round the wheel and their label-derived distributions, as the loaders give them."""
    runtime = make_runtime(cfg)
    backbone = backbone_from_config(cfg.backbone)
    wheel = MIKELS8
    text_weight = F.normalize(torch.randn(wheel.num_classes, backbone.model.visual.output_dim), dim=-1)
    model = build_run_model(backbone, wheel, cfg, text_weight)
    groups = param_groups(model)
    tuned = tuned_groups(cfg.train)
    set_trainable(model, groups, tuned)
    runtime.lower_frozen(model, [p for g in tuned for p in groups[g].values()])
    optimizer = build_optimizer(groups, cfg)
    scheduler = warmup_cosine(optimizer, *schedule_length(cfg.train, SCHEDULE_STEPS_PER_EPOCH, runtime.num_processes))
    prepared, optimizer, scheduler = runtime.prepare(model, optimizer, scheduler)
    plain = runtime.unwrap_model(prepared).train()
    phase = cfg.train.phases[-1]
    set_trainable(plain, groups, phase_groups(phase, cfg.train.train_backbone), phase.stages)
    state = TrainState(cfg=cfg, out_dir=Path(), runtime=runtime, plain=plain, groups=groups, saved_names=[],
                       model=torch.compile(prepared, backend=cfg.train.compile) if cfg.train.compile else prepared,
                       optimizer=optimizer, scheduler=scheduler, loaders={}, train_sampler=None, train_paths=[],
                       wheel=wheel, identity=backbone.identity, fingerprint={})
    size = plain.visual.image_size
    labels = torch.arange(batch_size) % wheel.num_classes
    distributions = torch.from_numpy(np.stack([strategy1(wheel, int(y)) for y in labels])).float()
    batch = {"image": torch.randn(batch_size, 3, *size), "label": labels, "distribution": distributions,
             "index": torch.arange(batch_size)}
    batch = {k: v.to(runtime.device) if k != "index" else v for k, v in batch.items()}
    return lambda: train_step(state, batch, phase), state, batch


def step_vs_bare(device: str = "cpu", batch: int = 32, prompts: int = 50, repeats: int = 5, name: str = "ViT-B-32",
                 precision: str = "fp32", model_cfg: Optional[dict] = None, backend: Optional[str] = None) -> dict:
    """The hybrid's training step as a run takes it (``run_step``) against the bare step of the same
    tower (the same module: the same weights and frozen parts), the same prompts (the run's initial
    ones, copied), the same batch and the same trained tower parameters (its LayerNorms), in
    ``repeats`` interleaved rounds after a warm-up: ``ratio`` compares minima, ``ratio_per_round``
    is the median of the ratios within a round. Either is what the hybrid adds to a plain
    prompted-ViT step: its head (NGA over the CLS tokens of 8 layers, stage adapters, three stages'
    classifier, fusion), its losses (dual-task, stage consistency) and the run's machinery
    (accelerate, AdamW's groups, the schedule, the finite checks). With ``backend``
    both are compiled (``torch.compile``) and the seconds of their first steps, which compile, are
    reported."""
    overrides = [f"device={device}", f"precision={precision}", f"backbone.name={name}", "backbone.random_init=true",
                 f"model.prompt_tokens={prompts}", f"train.compile={backend or 'null'}"]
    if model_cfg is not None:
        overrides.append(f"backbone.model_cfg={json.dumps(model_cfg)}")
    cfg = load_config([], overrides)
    torch.manual_seed(0)
    hybrid, state, data = run_step(cfg, batch)
    plain, runtime = state.plain, state.runtime
    bare = BareViT(plain.visual, plain.prompts.tokens, len(state.wheel.classes))
    forward = torch.compile(bare, backend=backend) if backend else bare
    steps = [hybrid, bare_step(forward, data["image"], data["label"], runtime.autocast, cfg.train.lr["prompts"])]
    out: dict = {"trained_parameters": {"hybrid": sum(p.numel() for p in plain.parameters() if p.requires_grad),
                                        "bare": sum(p.numel() for p in bare.parameters() if p.requires_grad)}}
    if backend:
        out["compile_s"] = {}
        for label, step in zip(("hybrid", "bare"), steps):
            start = time.perf_counter()
            step()
            out["compile_s"][label] = time.perf_counter() - start
    times = interleaved(steps, repeats, runtime.device)
    out["step_ms"] = {"hybrid": 1000 * min(times[0]), "bare": 1000 * min(times[1])}
    out["ratio"] = min(times[0]) / min(times[1])
    # The two steps of a round run next to each other, under the same load: on a loaded host the median
    # of the within-round ratios moves less than the ratio of minima, which may come from different moments.
    out["ratio_per_round"] = statistics.median(h / b for h, b in zip(*times))
    out["timing_noise"] = timing_noise(times)
    return out


def _bare_ratio(measured: dict, out: dict, prefix: str = "train_step") -> None:
    """``step_vs_bare``'s row among the bench's: the ratio, both steps' milliseconds and trained
    parameters, its timing noise (and compile seconds where compiled)."""
    out[f"{prefix}_vs_bare"] = measured["ratio"]
    out[f"{prefix}_vs_bare_per_round"] = measured["ratio_per_round"]
    out[f"{prefix}_vs_bare_ms"] = measured["step_ms"]
    out[f"{prefix}_vs_bare_trained_parameters"] = measured["trained_parameters"]
    if "compile_s" in measured:
        out[f"{prefix}_vs_bare_compile_s"] = measured["compile_s"]
    out.setdefault("timing_noise", {})["vs_bare"] = measured["timing_noise"]


def _cache_speedup(model: HybridCascadeLaFTer, images: torch.Tensor, repeats: int,
                   device: torch.device) -> tuple[float, float]:
    """Step time of head training on re-encoded images / on cached layer features (what an epoch
    with the feature cache runs), and the timing noise."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    head_params = [p for m in (model.adapters, model.fusion) for p in m.parameters()]
    for p in head_params:
        p.requires_grad_(True)
    head_opt = torch.optim.AdamW(head_params, lr=1e-4)
    with torch.no_grad():
        cached = model.layer_features(images)

    def head_step(features_fn):
        def run():
            loss = model.forward_head(features_fn()).logits.logsumexp(-1).mean()
            head_opt.zero_grad(set_to_none=True)
            loss.backward()
            head_opt.step()
        return run

    def encode():
        with torch.no_grad():
            return model.layer_features(images)

    times = interleaved([head_step(encode), head_step(lambda: cached)], repeats, device)
    return min(times[0]) / min(times[1]), timing_noise(times)


def _jpegs(folder: Path, count: int, size: tuple[int, int] = (480, 640)) -> list[Sample]:
    """``count`` random JPEGs (quality 90) of ``size`` (h, w), labelled round the wheel; written by
    a thread per core (encoding releases the GIL)."""
    def write(i: int) -> Sample:
        path = folder / f"{i}.jpg"
        pixels = np.random.default_rng(i).integers(0, 255, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
        return Sample(str(path), i % 8)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        return list(pool.map(write, range(count)))


def _loader_rate(dataset: Any, batch: int, workers: int, view: Optional[Callable] = None, rounds: int = 1) -> float:
    """Images/s of iterating a loader over ``dataset`` (the least disturbed of ``rounds`` passes),
    with ``view`` applied to each batch's images."""
    loader = make_loader(dataset, batch, False, 0, num_workers=workers)

    def one_pass() -> None:
        for b in loader:
            if view is not None:
                view(b["image"])
    (times,) = interleaved([one_pass], rounds, torch.device("cpu"), warmup=0)
    return len(dataset) / min(times)


def data_rates(preprocess: Callable, preprocess_cfg: Any, batch: int, images: int = 96, workers: int = 2) -> dict:
    """Images/s of turning files into model inputs, on synthetic 640×480 JPEGs: decoding and
    preprocessing in ``workers`` processes (``pipeline_images_per_s``: does loading or compute
    limit a run), and per CPU core (one process, one thread): the same JPEG path, building the
    image store (its decoding, once), and reading batches from it with the training view (random
    crop and flip from the margin store) and the evaluation view; ``store_over_jpeg_per_core`` is
    the slower view's rate over the JPEG path's."""
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        samples = _jpegs(Path(tmp), images)
        out = {"pipeline_images_per_s": _loader_rate(EmotionImages(samples, MIKELS8, preprocess), batch, workers)}
        torch.set_num_threads(1)
        try:
            out["jpeg_images_per_s_per_core"] = _loader_rate(EmotionImages(samples, MIKELS8, preprocess), batch, 0)
            splits = {split: EmotionImages(samples, MIKELS8, preprocess) for split in ("train", "test")}
            start = time.perf_counter()
            stored, view = stored_datasets(splits, preprocess_cfg, DataConfig(train_augment="crop_flip"),
                                           Path(tmp) / "cache", progress=False)
            out["store_build_images_per_s"] = 2 * images / (time.perf_counter() - start)  # two stores
            for split, train in (("train", True), ("test", False)):
                out[f"store_{'train' if train else 'eval'}_images_per_s_per_core"] = _loader_rate(
                    stored[split], batch, 0, lambda x, train=train: view(x, train), rounds=5)
        finally:
            torch.set_num_threads(threads)
    slower = min(out["store_train_images_per_s_per_core"], out["store_eval_images_per_s_per_core"])
    out["store_over_jpeg_per_core"] = slower / out["jpeg_images_per_s_per_core"]
    return out


def compile_rates(backend: str = "inductor", device: str = "cuda", batch: int = 256, prompts: int = 50,
                  repeats: int = 5, name: str = "ViT-B-32", precision: str = "bf16",
                  model_cfg: Optional[dict] = None) -> dict:
    """Eval and training-step images/s of HybridCascade and LaFTer under ``torch.compile(backend)``
    (interleaved minima after compiling; compile seconds apart) and their ratios; and a run's
    compiled training step against the compiled bare step (``step_vs_bare``)."""
    pair, _, _ = _models(device, batch, prompts, repeats, name, precision, model_cfg)
    images, dev = pair.images, pair.device
    optimizers = [_train_all_but_backbone(m) for m in (pair.hybrid, pair.lafter)]
    out: dict = {"device": _device_name(dev), "torch": torch.__version__, "backend": backend, "batch": batch,
                 "prompts": prompts, "model": name, "precision": precision}
    for mode in ("eval", "train"):
        compiled = [torch.compile(m.train(mode == "train"), backend=backend) for m in (pair.hybrid, pair.lafter)]
        fns = [_forward(c, images, pair.cast) if mode == "eval" else _step(c, opt, images, pair.cast)
               for c, opt in zip(compiled, optimizers)]
        start = time.perf_counter()
        for fn in fns:  # the first calls compile
            fn()
        out[f"{mode}_compile_s"] = time.perf_counter() - start
        times = interleaved(fns, repeats if mode == "eval" else pair.fewer, dev, warmup=0)
        out[f"{mode}_images_per_s"] = {"hybrid": batch / min(times[0]), "lafter": batch / min(times[1])}
        out[f"{mode}_ratio"] = min(times[0]) / min(times[1])
        out[f"{mode}_timing_noise"] = timing_noise(times)
    _bare_ratio(step_vs_bare(device, batch, prompts, pair.fewer, name, precision, model_cfg, backend), out, "train")
    return out


def epoch_rates(device: str = "cuda", precision: str = "bf16", batch: int = 256, images: int = 8192,
                workers: Optional[int] = None, prompts: int = 50, name: str = "ViT-B-32",
                model_cfg: Optional[dict] = None, image_size: tuple[int, int] = (480, 640)) -> dict:
    """End to end, data included: training images/s of HybridCascade-LaFTer (``name`` at random
    init, the default phase 2's groups) over ``images`` synthetic JPEGs, two epochs decoding the
    files in every epoch against two epochs reading the image store (built beforehand, its time
    reported apart); the second epoch of each is the warm one."""
    import json

    from ..core.config import load_config
    from ..data import write_manifest
    from ..engine.inputs import prepare_stores
    from ..engine.run import train_run

    workers = os.cpu_count() if workers is None else workers
    out: dict = {"device": device, "precision": precision, "batch": batch, "images": images, "workers": workers,
                 "image_size": list(image_size)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        samples = _jpegs(root / "images", images, image_size)
        write_manifest(root / "manifest.csv", samples, MIKELS8)
        groups = "[prompts, layernorms, classifier, stage_adapters, fusion, nga]"
        overrides = [
            f"device={device}", f"precision={precision}", f"backbone.name={name}", "backbone.random_init=true",
            f"model.prompt_tokens={prompts}", "data.format=manifest", f"data.root={root / 'manifest.csv'}",
            "data.split_ratios=[0.9,0.05,0.05]", "data.verify_images=false", f"data.batch_size={batch}",
            f"data.eval_batch_size={batch}", f"data.num_workers={workers}", "text.steps=10",
            f"train.phases=[{{epochs: 2, train: {groups}}}]", f"cache_dir={root / 'cache'}"]
        if model_cfg is not None:
            overrides.append(f"backbone.model_cfg={json.dumps(model_cfg)}")
        for store in (False, True):
            cfg = load_config([], [*overrides, f"data.image_store={str(store).lower()}"])
            key = "store" if store else "jpeg"
            if store:
                start = time.perf_counter()
                prepare_stores(cfg, progress=False)
                out["store_build_s"] = time.perf_counter() - start
            train_run(cfg, root / key, progress=False)
            records = runfiles.read_records(root / key)
            train_images = sum(1 for _ in (root / key / "splits" / "train.csv").open()) - 1
            out[f"{key}_images_per_s"] = [train_images / r["time_s"] for r in records]
    out["store_over_jpeg"] = out["store_images_per_s"][-1] / out["jpeg_images_per_s"][-1]
    return out


def onnx_latency(batch: int = 32, prompts: int = 50, repeats: int = 5, name: str = "ViT-B-32",
                 model_cfg: Optional[dict] = None) -> dict:
    """Per-image eval latency of HybridCascade-LaFTer on CPU: ONNX Runtime against PyTorch, on the
    same random-init model exported as ``hclafter export --format onnx`` does, in interleaved
    rounds (minima compared), both with PyTorch's thread count."""
    import tempfile
    from importlib.metadata import version

    from .export import onnx_session, write_onnx

    dev = torch.device("cpu")
    torch.manual_seed(0)
    backbone = load_backbone(name, model_cfg=model_cfg)
    model = HybridCascadeLaFTer(backbone, 8, prompt_tokens=prompts).eval()
    size = backbone.preprocess_cfg.size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(batch, 3, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        session = onnx_session(write_onnx(model, Path(tmp) / "model.onnx", images[:2]), torch.get_num_threads())
        feed = {"images": images.numpy()}
        with torch.inference_mode():
            times = interleaved([lambda: model.forward_stages(images), lambda: session.run(None, feed)], repeats, dev)
            expected = model.forward_stages(images).logits.softmax(-1).numpy()
        diff = float(abs(session.run(None, feed)[0] - expected).max())
    t_torch, t_onnx = min(times[0]), min(times[1])
    return {"device": _device_name(dev), "torch": torch.__version__, "onnxruntime": version("onnxruntime"),
            "threads": torch.get_num_threads(), "batch": batch, "prompts": prompts, "model": name,
            "repeats": repeats, "pytorch_ms_per_image": 1000 * t_torch / batch,
            "onnxruntime_ms_per_image": 1000 * t_onnx / batch, "onnxruntime_speedup": t_torch / t_onnx,
            "max_abs_diff": diff, "timing_noise": timing_noise(times)}


def cmd_bench(args: argparse.Namespace) -> int:
    if args.onnx:
        result = onnx_latency(args.batch, args.prompts, args.repeats)
    elif args.epoch:
        result = epoch_rates(args.device, args.precision, args.batch, args.epoch, prompts=args.prompts)
    elif args.step:
        result = step_vs_bare(args.device, args.batch, args.prompts, args.repeats, precision=args.precision,
                              backend=args.compile)
    elif args.compile:
        result = compile_rates(args.compile, args.device, args.batch, args.prompts, args.repeats,
                               precision=args.precision)
    else:
        result = run_bench(args.device, args.batch, args.prompts, args.repeats, precision=args.precision)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        width = max(map(len, result), default=0) + 2  # a key never runs into its value
        for key, value in result.items():
            print(f"{key:<{width}}{value:.4f}" if isinstance(value, float) else f"{key:<{width}}{value}")
    return 0
