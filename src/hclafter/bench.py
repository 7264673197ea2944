"""Speed, memory and FLOP benchmarks: HybridCascade-LaFTer against plain LaFTer (same backbone
and prompts) and the Cascade-CLIP baseline, measured side by side in one process.

Single timings on a shared machine drift by ±10 % and more, so the two sides of every ratio are
interleaved and repeated, and their minima are compared: the workload is deterministic, so the
least disturbed run is the stablest estimate of its cost. How disturbed the machine was is
reported too (``timing_noise``: median / minimum − 1 of each measurement).
"""
from __future__ import annotations

import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .backbone import load_backbone
from .data import EmotionImages, Sample, make_loader
from .emotions import MIKELS8
from .evaluation import count_gflops
from .models import CascadeCLIPClassifier, HybridCascadeLaFTer
from .models.vit import project
from .timing import interleaved, timing_noise
from .training import param_groups


def _reference(dtype: torch.dtype, device: torch.device, flops: float) -> tuple[Callable[[], None], float]:
    """About ``flops`` FLOPs (at least one product) of square matrix products, 2048² on CPU and 8192²
    on GPU, and their exact FLOPs: the rate the device reaches on plain matrix arithmetic, which
    utilisation divides by."""
    size = 8192 if device.type == "cuda" else 2048
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
    a copy of the CLS token at each extraction layer (all from one block output here, at the same
    cost), their projection, and the head."""
    cls = torch.stack([block_output[:, 0].clone() for _ in model.extraction_layers])
    return model.forward_head(project(model.visual, cls)).logits


def _cascade_tail(model: CascadeCLIPClassifier, block_output: torch.Tensor) -> torch.Tensor:
    """Cascade-CLIP's counterpart of ``_tail``: its projections, layer weighting and decoders."""
    return model.forward_head(({layer: block_output for layer in model.extraction_layers}, block_output)).logits


def _tail_step(model: HybridCascadeLaFTer, block_output: torch.Tensor,
               optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """The part of a training step that differs between the models: the tail, its backward into the
    block outputs (one CLS gradient per extraction layer, added into the residual stream's gradient)
    and the update of the parameters it reaches."""
    def run() -> None:
        loss = _tail(model, block_output).float().logsumexp(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        block_output.grad = None
        loss.backward()
        optimizer.step()
    return run


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


def run_bench(device: str = "cpu", batch: int = 32, prompts: int = 50, repeats: int = 5,
              name: str = "ViT-B-32", precision: str = "fp32", model_cfg: Optional[dict] = None) -> dict:
    """Every ratio of the performance targets, for ``name`` at random init (speed does not depend on
    the weights). ``precision`` (fp32 or bf16 autocast) applies to the HybridCascade/LaFTer timings.

    Whole forwards and training steps are timed in ``repeats`` interleaved rounds (the training
    step, feature cache and Cascade-CLIP comparisons in half as many, the precision not asked for
    in one without warm-up). On a shared machine their minima still move by several per cent
    between runs, more than the 0.1 % of work the cascade adds, so the eval, training and
    Cascade-CLIP ratios are also given ``_from_parts``: the models run the same embedding and
    blocks and differ only in the tail after them (milliseconds), which is timed in
    20 × ``repeats`` interleaved rounds and added to the directly measured time of the other side."""
    dev = torch.device(device)
    torch.manual_seed(0)
    backbone = load_backbone(name, model_cfg=model_cfg)
    backbone.model.to(dev)
    hybrid = HybridCascadeLaFTer(backbone, 8, prompt_tokens=prompts).to(dev)
    lafter = HybridCascadeLaFTer(backbone, 8, prompt_tokens=prompts, stages=[[hybrid.visual.transformer.layers]],
                                 stage_adapters=False).to(dev)
    lafter.prompts.load_state_dict(hybrid.prompts.state_dict())
    size = backbone.preprocess_cfg.size
    size = size if isinstance(size, int) else size[0]
    cast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    pair = _Pair(hybrid, lafter, torch.randn(batch, 3, size, size, device=dev), cast, precision, repeats)
    out: dict = {"device": _device_name(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "batch": batch, "prompts": prompts, "model": name, "precision": precision, "repeats": repeats,
                 "timing_noise": {}}
    _eval_ratios(pair, out)
    _train_ratios(pair, out)
    out["cache_speedup"], out["timing_noise"]["cache"] = _cache_speedup(hybrid, pair.images, pair.fewer, dev)
    embeddings = F.normalize(torch.randn(8, hybrid.visual.output_dim), dim=-1)
    _cascade_ratios(pair, CascadeCLIPClassifier(backbone, 8, embeddings, prompt_tokens=prompts).to(dev).eval(), out)
    out["pipeline_images_per_s"] = pipeline_rate(backbone.preprocess, batch)
    return out


def _eval_ratios(pair: _Pair, out: dict) -> None:
    """Inference: FLOPs, time (direct and from parts), images/s, and utilisation in both precisions."""
    hybrid, lafter, images, dev, batch = pair.hybrid, pair.lafter, pair.images, pair.device, len(pair.images)
    for m in (hybrid, lafter):
        m.eval()
    flops_h, flops_l = count_gflops(hybrid, images[:1]), count_gflops(lafter, images[:1])
    out["gflops_per_image"] = {"hybrid": flops_h, "lafter": flops_l}
    out["eval_flops_ratio"] = flops_h / flops_l
    # The reference does the hybrid forward's FLOPs as square matrix products, timed in the same
    # rounds, so that utilisation compares the two under the same load of the machine.
    eval_dtype = torch.bfloat16 if pair.precision == "bf16" else torch.float32
    reference, reference_flops = _reference(eval_dtype, dev, batch * flops_h * 1e9)
    with torch.inference_mode(), pair.cast():
        times = interleaved([lambda: hybrid(images), lambda: lafter(images), reference], pair.repeats, dev)
        block_output = hybrid.embed(images)  # [B, N, W], the shape of every block's output
        tails = interleaved([lambda: _tail(hybrid, block_output), lambda: _tail(lafter, block_output)],
                            20 * pair.repeats, dev)
    t_h, t_l = min(times[0]), min(times[1])
    out["eval_time_ratio"] = t_h / t_l
    out["eval_time_ratio_from_parts"] = 1 + (min(tails[0]) - min(tails[1])) / t_l
    out["eval_images_per_s"] = {"hybrid": batch / t_h, "lafter": batch / t_l}
    out["timing_noise"]["eval"] = timing_noise(times[:2])
    # Encoder FLOP utilisation in both precisions: images/s × FLOPs per image / matrix-product rate.
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if dtype == eval_dtype:
            t, peak = t_h, reference_flops / min(times[2]) / 1e9
        else:  # one run without warm-up: this precision's targets are about a factor of 2
            other, other_flops = _reference(dtype, dev, 0)
            with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                t, t_ref = (min(ts) for ts in interleaved([lambda: hybrid(images), other], 1, dev, warmup=0))
            peak = other_flops / t_ref / 1e9
        out[f"{label}_matmul_gflops"] = peak
        out[f"{label}_images_per_s"] = batch / t
        out[f"{label}_utilisation"] = batch / t * flops_h / peak
    out["bf16_over_fp32_throughput"] = out["bf16_images_per_s"] / out["fp32_images_per_s"]


def _train_ratios(pair: _Pair, out: dict) -> None:
    """Training: memory kept for backward, step time (direct and from parts), CUDA peak memory."""
    hybrid, lafter, images, dev, batch = pair.hybrid, pair.lafter, pair.images, pair.device, len(pair.images)
    opt_h, opt_l = _train_all_but_backbone(hybrid), _train_all_but_backbone(lafter)

    def step(model, opt):
        def run():
            with pair.cast():
                loss = model.forward_stages(images).logits.float().logsumexp(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    hybrid.train(), lafter.train()
    with pair.cast():  # counting the memory also warms both steps up
        mem_h, mem_l = training_memory_bytes(hybrid, images), training_memory_bytes(lafter, images)
    out["train_memory_bytes"] = {"hybrid": mem_h, "lafter": mem_l}
    out["train_memory_ratio"] = mem_h / mem_l
    times = interleaved([step(hybrid, opt_h), step(lafter, opt_l)], pair.fewer, dev, warmup=0)
    s_h, s_l = min(times[0]), min(times[1])
    with torch.no_grad():
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
        for run in (step(hybrid, opt_h), step(lafter, opt_l)):
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
        tails = interleaved([lambda: _cascade_tail(cascade, block_output), lambda: _tail(hybrid, block_output)],
                            20 * pair.repeats, dev)
    t_h = len(images) / out["eval_images_per_s"]["hybrid"]
    out["cascadeclip_over_hybrid_time"] = min(times[0]) / min(times[1])
    out["cascadeclip_over_hybrid_time_from_parts"] = 1 + (min(tails[0]) - min(tails[1])) / t_h
    out["timing_noise"]["cascadeclip"] = timing_noise(times)
    out["gflops_per_image"]["cascadeclip"] = count_gflops(cascade, images[:1])
    out["cascadeclip_over_hybrid_flops"] = out["gflops_per_image"]["cascadeclip"] / out["gflops_per_image"]["hybrid"]


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


def pipeline_rate(preprocess, batch: int, images: int = 96, workers: int = 2) -> float:
    """Images/s of decoding + preprocessing alone (synthetic 640×480 JPEGs, ``workers`` processes),
    to tell whether loading or compute limits a run."""
    import tempfile

    import numpy as np
    from PIL import Image

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
