"""Speed, memory and FLOP benchmarks: HybridCascade-LaFTer against plain LaFTer (same backbone
and prompts) and the Cascade-CLIP baseline, measured side by side in one process.

Single timings on a shared machine drift by ±10 %, so the two sides of every ratio are
interleaved, repeated, and compared by their medians.
"""
from __future__ import annotations

import platform
import statistics
import time
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F

from .backbone import load_backbone
from .cascadeclip import CascadeCLIPClassifier
from .evaluation import count_gflops
from .model import HybridCascadeLaFTer
from .training import param_groups


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _paired_medians(a: Callable[[], object], b: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b``, run alternately (ABBA order, so neither side always goes
    first) after one warm-up each."""
    times: tuple[list[float], list[float]] = ([], [])
    for fn in (a, b):
        fn()
    for r in range(repeats):
        pairs = ((a, times[0]), (b, times[1]))
        for fn, out in (pairs if r % 2 == 0 else pairs[::-1]):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def matmul_gflops(dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


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


def run_bench(device: str = "cpu", batch: int = 32, prompts: int = 50, repeats: int = 5,
              name: str = "ViT-B-32", precision: str = "fp32") -> dict:
    """Every ratio of the performance targets, for ``name`` at random init (speed does not depend on
    the weights). ``precision`` (fp32 or bf16 autocast) applies to the HybridCascade/LaFTer timings."""
    dev = torch.device(device)
    cast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    torch.manual_seed(0)
    backbone = load_backbone(name)
    backbone.model.to(dev)
    hybrid = HybridCascadeLaFTer(backbone, 8, prompt_tokens=prompts).to(dev)
    lafter = HybridCascadeLaFTer(backbone, 8, prompt_tokens=prompts, stages=[[hybrid.visual.transformer.layers]],
                                 stage_adapters=False).to(dev)
    lafter.prompts.load_state_dict(hybrid.prompts.state_dict())
    size = backbone.preprocess_cfg.size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(batch, 3, size, size, device=dev)
    out: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
                 "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": batch, "prompts": prompts,
                 "model": name, "precision": precision}

    flops_h, flops_l = count_gflops(hybrid, images[:1]), count_gflops(lafter, images[:1])
    out["gflops_per_image"] = {"hybrid": flops_h, "lafter": flops_l}
    out["eval_flops_ratio"] = flops_h / flops_l

    for m in (hybrid, lafter):
        m.eval()
    with torch.inference_mode(), cast():
        t_h, t_l = _paired_medians(lambda: hybrid(images), lambda: lafter(images), repeats, dev)
    out["eval_time_ratio"] = t_h / t_l
    out["eval_images_per_s"] = {"hybrid": batch / t_h, "lafter": batch / t_l}

    opt_h, opt_l = _train_all_but_backbone(hybrid), _train_all_but_backbone(lafter)

    def step(model, opt):
        def run():
            with cast():
                loss = model.forward_stages(images).logits.float().logsumexp(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    hybrid.train(), lafter.train()
    s_h, s_l = _paired_medians(step(hybrid, opt_h), step(lafter, opt_l), repeats, dev)
    out["train_step_ratio"] = s_h / s_l
    out["train_images_per_s"] = {"hybrid": batch / s_h, "lafter": batch / s_l}
    with cast():
        mem_h, mem_l = training_memory_bytes(hybrid, images), training_memory_bytes(lafter, images)
    out["train_memory_bytes"] = {"hybrid": mem_h, "lafter": mem_l}
    out["train_memory_ratio"] = mem_h / mem_l
    if dev.type == "cuda":
        peaks = []
        for run in (step(hybrid, opt_h), step(lafter, opt_l)):
            torch.cuda.reset_peak_memory_stats(dev)
            run()
            peaks.append(torch.cuda.max_memory_allocated(dev))
        out["cuda_peak_memory_ratio"] = peaks[0] / peaks[1]

    hybrid.eval()
    rates = {}
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        autocast = torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
        with torch.inference_mode(), autocast:  # 3 repeats: bf16 is slow on CPUs without bf16 matrix units
            t, _ = _paired_medians(lambda: hybrid(images), lambda: None, min(repeats, 3), dev)
        peak = matmul_gflops(dtype, dev, size=8192 if dev.type == "cuda" else 2048)
        rates[label] = batch / t
        out[f"{label}_matmul_gflops"] = peak
        out[f"{label}_utilisation"] = batch / t * flops_h / peak
        out[f"{label}_images_per_s"] = batch / t
    out["bf16_over_fp32_throughput"] = rates["bf16"] / rates["fp32"]

    # An epoch with the feature cache runs only the head; without it every batch is re-encoded.
    for p in hybrid.parameters():
        p.requires_grad_(False)
    head_params = [p for m in (hybrid.adapters, hybrid.fusion) for p in m.parameters()]
    for p in head_params:
        p.requires_grad_(True)
    head_opt = torch.optim.AdamW(head_params, lr=1e-4)
    with torch.no_grad():
        cached = hybrid.layer_features(images)

    def head_step(features_fn):
        def run():
            loss = hybrid.head(features_fn()).logits.logsumexp(-1).mean()
            head_opt.zero_grad(set_to_none=True)
            loss.backward()
            head_opt.step()
        return run

    def encode():
        with torch.no_grad():
            return hybrid.layer_features(images)

    t_full, t_cached = _paired_medians(head_step(encode), head_step(lambda: cached), repeats, dev)
    out["cache_speedup"] = t_full / t_cached

    embeddings = F.normalize(torch.randn(8, hybrid.visual.output_dim), dim=-1)
    cascade = CascadeCLIPClassifier(backbone, 8, embeddings, prompt_tokens=prompts).to(dev).eval()
    with torch.inference_mode(), cast():
        t_c, t_h = _paired_medians(lambda: cascade(images), lambda: hybrid(images), repeats, dev)
    out["cascadeclip_over_hybrid_time"] = t_c / t_h
    out["gflops_per_image"]["cascadeclip"] = count_gflops(cascade, images[:1])
    out["pipeline_images_per_s"] = pipeline_rate(backbone.preprocess, batch)
    return out


def pipeline_rate(preprocess, batch: int, images: int = 96, workers: int = 2) -> float:
    """Images/s of decoding + preprocessing alone (synthetic 640×480 JPEGs, ``workers`` processes),
    to tell whether loading or compute limits a run."""
    import tempfile
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from .data import EmotionImages, Sample, make_loader
    from .emotions import MIKELS8

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        samples = []
        for i in range(images):
            path = Path(tmp) / f"{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(path, quality=90)
            samples.append(Sample(str(path), i % 8))
        loader = make_loader(EmotionImages(samples, MIKELS8, preprocess), batch, False, 0, num_workers=workers)
        start = time.perf_counter()
        for _ in loader:
            pass
        return images / (time.perf_counter() - start)
