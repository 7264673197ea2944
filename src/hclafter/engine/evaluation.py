"""Running a classifier over a split and computing the field's metrics."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..core.config import DataConfig
from ..core.emotions import Wheel
from ..core.metrics import classification_metrics, ldl_metrics, polarity_accuracy, stage_accuracies
from ..core.progress import bar, finished
from ..core.timing import interleaved, per_image_ms
from ..data import eval_loader

# images → (fused logits [B, C], per-stage logits [S, B, C] or None)
Classify = Callable[[torch.Tensor], tuple[torch.Tensor, Optional[torch.Tensor]]]


@dataclass
class Predictions:
    logits: np.ndarray  # [N, C]
    stage_logits: Optional[np.ndarray]  # [S, N, C]
    labels: np.ndarray  # [N]
    distributions: np.ndarray  # [N, C] targets
    indices: np.ndarray  # [N] positions in the split

    @property
    def probabilities(self) -> np.ndarray:
        return softmax(self.logits)

    @property
    def stage_probabilities(self) -> Optional[np.ndarray]:
        """[S, N, C] each stage's own prediction, or None for a model without stages."""
        return None if self.stage_logits is None else softmax(self.stage_logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities along the last axis (class scores), computed stably."""
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def clip_classifier(model: torch.nn.Module, weight: torch.Tensor, scale: float, accelerator) -> Classify:
    """Plain CLIP image features (no prompts), L2-normalised, against class weights [C, D]: the
    zero-shot classifier (template embeddings, CLIP's temperature) or the stage-1 text classifier."""

    def classify(images: torch.Tensor):
        with accelerator.autocast():
            features = model.encode_image(images)
        return scale * F.normalize(features.float(), dim=-1) @ weight.to(features.device).T, None

    return classify


@torch.no_grad()
def predict(classify: Classify, loader: DataLoader, accelerator=None, desc: str = "eval",
            progress: bool = True) -> Predictions:
    """Predictions for every sample of ``loader``, in split order, gathered across processes.
    ``progress``: a bar on a terminal, else one line when done."""
    started = time.time()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("logits", "stage", "label", "dist", "index")}
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    for batch in bar(loader, desc, progress):
        logits, stage = classify(batch["image"].to(device))
        values = {"logits": logits.float(), "label": batch["label"].to(device),
                  "dist": batch["distribution"].to(device), "index": batch["index"].to(device)}
        if stage is not None:
            values["stage"] = stage.float().transpose(0, 1)  # batch first, so gathering concatenates samples
        if accelerator is not None:
            values = accelerator.gather_for_metrics(values)
        for key, value in values.items():
            parts[key].append(value.cpu())
    order = torch.cat(parts["index"]).argsort()
    finished(desc, f"{len(order)} images", started, progress)
    stage = torch.cat(parts["stage"])[order].transpose(0, 1).numpy() if parts["stage"] else None
    return Predictions(torch.cat(parts["logits"])[order].numpy(), stage, torch.cat(parts["label"])[order].numpy(),
                       torch.cat(parts["dist"])[order].numpy(), torch.cat(parts["index"])[order].numpy())


def compute_metrics(preds: Predictions, wheel: Wheel) -> dict:
    """Accuracy, macro-F1, per-class scores, confusion matrix, polarity and per-stage accuracy, LDL."""
    y_pred = preds.logits.argmax(axis=1)
    out = classification_metrics(preds.labels, y_pred, wheel.classes)
    out["polarity_accuracy"] = polarity_accuracy(preds.labels, y_pred, wheel.polarity)
    if preds.stage_logits is not None:
        out["stage_accuracy"] = stage_accuracies(preds.stage_logits, preds.labels)
    out["ldl"] = ldl_metrics(preds.probabilities, preds.distributions)
    out["num_samples"] = int(len(preds.labels))
    return out


def evaluate_classifier(classify: Classify, dataset: Dataset, cfg: DataConfig, wheel: Wheel, accelerator=None,
                        progress: bool = True, desc: str = "eval") -> dict:
    """Every metric of ``classify`` on a dataset, through the one evaluation loader."""
    return compute_metrics(predict(classify, eval_loader(dataset, cfg, accelerator), accelerator, desc=desc,
                                   progress=progress), wheel)


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


# The counter knows the CUDA attention kernels but not the CPU one.
_COUNTER_EXTRAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def count_gflops(fn: Callable[[torch.Tensor], object], inputs: torch.Tensor) -> float:
    """GFLOPs of ``fn(inputs)``, counted by torch.utils.flop_counter. The fused inference path of
    ``nn.MultiheadAttention`` is one op the counter does not see (a ViT's attention and its
    projections would go uncounted, a third of its FLOPs), so it is switched off while counting;
    the path it falls back to does the same arithmetic through ops the counter knows."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_COUNTER_EXTRAS) as counter:
            fn(inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() / 1e9


@torch.no_grad()
def efficiency(classify: Classify, images: torch.Tensor, repeats: int = 5) -> dict:
    """GFLOPs per image (counted, so exact for a given input size) and inference latency per image
    (median of ``repeats`` timed batches after one warm-up)."""
    gflops = count_gflops(classify, images[:1])
    (times,) = interleaved([lambda: classify(images)], repeats, images.device)
    return {"gflops_per_image": gflops, "latency_ms_per_image": per_image_ms(times, len(images)),
            "latency_batch": len(images)}
