"""Trained runs in other ecosystems' formats: a Hugging Face model directory and an ONNX graph.

The Hugging Face directory (``config.json``, ``model.safetensors``, ``README.md``) holds everything
the run learned beyond the public CLIP backbone, which is referenced by architecture and weights
hash (or embedded on request), so a shared model stays small and cannot silently run on other
weights. ``EmotionModel`` saves, loads and pushes it the way ``huggingface_hub``'s mixins do.

The ONNX graph maps preprocessed images to fused probabilities and per-stage logits, for runtimes
without PyTorch; its metadata carries the class order and the preprocessing to apply.

Both are written where nothing reads them (a staging folder beside the target, or memory), checked
(the directory loaded back and compared with the run; the graph's metadata and ONNX Runtime against
PyTorch) and only then renamed into place: a kill at any moment leaves the previous export or none.
``model.safetensors`` records the content hash of its tensors and of ``config.json``, so a damaged
directory is refused on loading.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import yaml
from huggingface_hub import ModelHubMixin, hf_hub_download
from omegaconf import OmegaConf
from PIL import Image
from safetensors import safe_open
from torch import nn

from ..core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..core.config import BackboneConfig, ModelConfig, to_dict
from ..core.emotions import Wheel
from ..core.files import RunError, atomic_write_bytes, atomic_write_text, replace_dir, staging_dir, write_json
from ..data.images import ImageError, load_rgb, to_rgb
from ..engine import runfiles
from ..engine.inference import Prediction, TrainedRun, load_run
from ..models import build_model, method_class
from ..models.backbone import Backbone, backbone_from_config, file_sha256
from ..version import __version__

HF_FORMAT = "hclafter-hf/2"  # 2: model.safetensors records the sha256 of its tensors and of config.json
HF_FILES = ("config.json", "model.safetensors", "README.md")
ONNX_OPSET = 21
ONNX_METADATA = ("hclafter_format", "hclafter_version", "classes", "preprocess", "backbone", "outputs")
SUMMARY_KEYS = ("accuracy", "macro_f1", "polarity_accuracy")


class ExportError(RunError):
    """A run cannot be exported, an exported model cannot be loaded, or an optional package is missing."""


def missing_extra(what: str, extra: str, error: ImportError) -> ExportError:
    """The message for an optional package that is not installed: which extra brings it."""
    return ExportError(f"{what} needs the optional package {error.name!r}: pip install 'hclafter[{extra}]'")


def _exported_tensors(run: TrainedRun, include_backbone: bool) -> dict[str, torch.Tensor]:
    """What the run learned beyond the public backbone: its saved weights (tuned LayerNorms of the
    tower included), every other parameter and buffer outside the tower (fixed initialisations and
    text-derived tensors the run would otherwise rebuild), and with ``include_backbone`` the tower."""
    with safe_open(str(run.run_dir / "model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    groups = run.model.param_groups()
    tower = {name for g in ("layernorms", "backbone") for name in groups.get(g, {})}  # CoOp's: the text tower too
    tensors = {}
    for name, tensor in [*run.model.named_parameters(), *run.model.named_buffers()]:
        if include_backbone or name in saved or not (name in tower or name.startswith("visual.")):
            tensors[name] = tensor.detach().float().cpu().contiguous()
    return tensors


def _weights_file(run: TrainedRun) -> Optional[str]:
    """The run's backbone weights file, where it has one."""
    weights = run.backbone.identity["weights"]
    return run.cfg.backbone.pretrained if isinstance(weights, dict) and "file" in weights else None


def _seed_results(run_dir: Path) -> list[dict]:
    """Test metrics of this run and, inside a sweep (``.../seedN``), of its sibling seeds."""
    siblings = [run_dir]
    if re.fullmatch(r"seed\d+", run_dir.name):
        siblings = sorted((p for p in run_dir.parent.glob("seed*") if runfiles.is_finished(p)),
                          key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else -1)
    results = []
    for folder in siblings:
        summary, seed = runfiles.tested(folder, runfiles.read_summary(folder)), runfiles.read_config(folder).seed
        test = summary["test"]
        results.append({"seed": seed, "exported": folder.resolve() == run_dir.resolve(),
                        **{k: test[k] for k in SUMMARY_KEYS}, "kl": test["ldl"]["kl"],
                        "cosine": test["ldl"]["cosine"], "test_images": test["num_samples"]})
    return results


def hf_config(run: TrainedRun, include_backbone: bool) -> dict[str, Any]:
    """``config.json``: what rebuilds the model (no local paths: the directory may be published)."""
    cfg, identity = run.cfg, run.backbone.identity
    weights = identity["weights"]
    summary = runfiles.tested(run.run_dir, runfiles.read_summary(run.run_dir))
    size = run.backbone.preprocess_cfg.size
    return {
        "format": HF_FORMAT, "hclafter_version": __version__,
        "classes": list(run.wheel.classes),
        "id2label": {str(i): c for i, c in enumerate(run.wheel.classes)},
        "label2id": {c: i for i, c in enumerate(run.wheel.classes)},
        "wheel": run.wheel.to_dict(),
        "model": to_dict(cfg)["model"],
        "backbone": {"name": cfg.backbone.name, "model_cfg": cfg.backbone.model_cfg,
                     "quick_gelu": identity["quick_gelu"], "init_seed": cfg.backbone.init_seed,
                     "identity": identity, "included": include_backbone,
                     "weights_file": weights.get("file") if isinstance(weights, dict) else None},
        "preprocess": {"size": list(size) if isinstance(size, (tuple, list)) else [size, size],
                       "mean": list(run.backbone.preprocess_cfg.mean), "std": list(run.backbone.preprocess_cfg.std),
                       "interpolation": run.backbone.preprocess_cfg.interpolation,
                       "resize_mode": run.backbone.preprocess_cfg.resize_mode},
        "training": {"run": run.run_dir.name, "seed": cfg.seed, "method": cfg.model.method,
                     "best_epoch": summary.get("best_epoch"), "epochs": summary.get("epochs"),
                     "data": {"format": cfg.data.format, "label_space": run.wheel.name,
                              "polarity": cfg.data.polarity, "few_shot": cfg.data.few_shot,
                              "distribution": cfg.data.distribution.source,
                              "num_samples": summary.get("num_samples")},
                     "parameters": summary.get("parameters", {}).get("trained"),
                     "results": _seed_results(run.run_dir)},
    }


def _fmt(values: Sequence[float], pct: bool) -> str:
    scale = 100.0 if pct else 1.0
    if len(values) == 1:
        return f"{scale * values[0]:.2f}" if pct else f"{values[0]:.4f}"
    mean, std = scale * float(np.mean(values)), scale * float(np.std(values, ddof=1))
    return f"{mean:.2f} ± {std:.2f}" if pct else f"{mean:.4f} ± {std:.4f}"


def model_card(config: dict[str, Any]) -> str:
    """``README.md`` for the Hub: results per seed, training data, intended use and limits. Long because
    it is mostly the card's text, one template read top to bottom."""
    training, backbone = config["training"], config["backbone"]
    data, results = training["data"], training["results"]
    synthetic = data["format"] == "synthetic"
    random_backbone = isinstance(backbone["identity"]["weights"], str)
    weights = backbone["identity"]["weights"]
    if backbone["included"]:
        weights_line = "embedded in `model.safetensors` (image tower)"
    elif random_backbone:
        weights_line = f"`{weights}`: rebuilt from the architecture, nothing to download"
    elif "sha256" in weights:
        weights_line = (f"not included; bring `{weights['file']}` (sha256 `{weights['sha256']}`) and pass "
                        f"`backbone_weights=` to `from_pretrained`")
    else:
        weights_line = f"open_clip pretrained tag `{weights['open_clip_tag']}` (open_clip downloads it)"
    rows = ["| seed | accuracy % | macro-F1 % | polarity % | KL ↓ | cosine ↑ | test images |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['seed']}{' (these weights)' if r['exported'] else ''} | {100 * r['accuracy']:.2f} | "
                    f"{100 * r['macro_f1']:.2f} | {100 * r['polarity_accuracy']:.2f} | {r['kl']:.4f} | "
                    f"{r['cosine']:.4f} | {r['test_images']} |")
    if len(results) > 1:
        rows.append(f"| mean ± std ({len(results)} seeds) | " + " | ".join(
            [_fmt([r[k] for r in results], True) for k in SUMMARY_KEYS] +
            [_fmt([r[k] for r in results], False) for k in ("kl", "cosine")]) + " | |")
    counts = data.get("num_samples") or {}
    warning = ""
    if synthetic:
        warning += ("\n> **Trained and tested on hclafter's synthetic emotion world** (drawn images whose emotions "
                    "are carried by colour, scene and texture cues). These numbers say nothing about photographs.\n")
    if random_backbone:
        warning += ("\n> **The CLIP backbone is randomly initialised**, not pre-trained: this model is a test "
                    "artefact and its numbers mean nothing about CLIP.\n")
    distribution = ("the images' own vote distributions" if data["distribution"] == "dataset"
                    else "a distribution around the label on the emotion wheel")
    few_shot = f"Few-shot: {data['few_shot']} training images per class. " if data["few_shot"] else ""
    front = {"library_name": "hclafter", "pipeline_tag": "image-classification",
             "tags": ["emotion-recognition", "clip", "hclafter", training["method"]]}
    classes = ", ".join(config["classes"])
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {training['run']}: image emotion recognition with CLIP ({training['method']})

Predicts one of {len(config['classes'])} emotions ({classes}; label space `{data['label_space']}`) and a
distribution over them from an image. Trained with hclafter (`model.method={training['method']}`,
{training['parameters']:,} trained parameters; epoch {training['best_epoch']} of {training['epochs']}, chosen on
validation).
{warning}
## Use

```python
import hclafter

model = hclafter.from_pretrained("this-directory-or-hub-id")  # backbone_weights="ViT-B-32.pt" if not embedded
pred = model.predict(["photo.jpg"])  # pred.labels, pred.distributions (columns in pred.classes order)
```

Backbone: `{backbone['name']}`, weights {weights_line}.

## Results (test split)

{chr(10).join(rows)}

Accuracy and macro-F1 over the {len(config['classes'])} classes; polarity accuracy on positive/negative;
KL(target ‖ predicted distribution) and cosine similarity of the distributions.

## Training data

Dataset format `{data['format']}`: {counts.get('train', '?')} training, {counts.get('val', '?')} validation and \
{counts.get('test', '?')} test images. Distribution targets: `{data['distribution']}` ({distribution}).
{few_shot}Model selection on validation only; the test split was evaluated once.

## Intended use

Research on visual emotion recognition: comparing methods, analysing which layers carry affect, and
predicting the emotions an image is likely to evoke in viewers like those who labelled the data.

## Limitations

- The numbers above hold for this dataset's test split only; on other image sources the accuracy is
  unknown. Emotions evoked by an image are subjective: labels and distributions reflect the
  dataset's annotators and sources.
- Do not use it to judge people, their feelings or their behaviour, or for any decision about them.
- The model inherits CLIP's biases.
"""


class EmotionModel(ModelHubMixin, library_name="hclafter", pipeline_tag="image-classification",
                   tags=["emotion-recognition", "clip"]):
    """A trained hclafter model outside its run directory: ``save_pretrained``,
    ``from_pretrained`` (a local directory or a Hub id) and ``push_to_hub``, as with
    ``huggingface_hub.PyTorchModelHubMixin``; ``predict`` as ``TrainedRun.predict``."""

    def __init__(self, config: dict, tensors: dict, backbone_weights: Optional[str] = None,
                 device: str = "cpu") -> None:
        self.config, self.tensors = config, tensors
        self.device = torch.device(device)
        self.wheel = Wheel.from_dict(config["wheel"])
        self.backbone = self._backbone(backbone_weights)
        model_cfg: ModelConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                                                      config["model"]))  # type: ignore[assignment]
        placeholder = None  # class embeddings (Cascade-CLIP's queries, Tip-Adapter's text term) come with the tensors
        if method_class(model_cfg.method).needs_class_embeddings:
            placeholder = torch.zeros(self.wheel.num_classes, self.backbone.model.visual.output_dim)
        self.model = build_model(self.backbone, self.wheel.num_classes, model_cfg, class_embeddings=placeholder,
                                 class_names=self.wheel.classes)
        self.model.size_like({name: tensor.shape for name, tensor in tensors.items()})
        self._load(tensors)
        self.model.to(self.device).eval()

    def _backbone(self, weights_file: Optional[str]) -> Backbone:
        info = self.config["backbone"]
        identity = info["identity"]
        weights = identity["weights"]
        cfg = BackboneConfig(info["name"], None, info["quick_gelu"], info["model_cfg"], info["init_seed"])
        if info["included"] or isinstance(weights, str):  # embedded, or random-init (rebuilt from its seed)
            cfg.random_init = True  # the tower's weights come from model.safetensors, or are the seeded init
            return backbone_from_config(cfg)
        if "open_clip_tag" in weights:
            cfg.pretrained = weights["open_clip_tag"]
            return backbone_from_config(cfg)
        hint = (f"pass from_pretrained(..., backbone_weights='/path/to/{weights['file']}'), or export the run with "
                "--include-backbone")
        if weights_file is None:
            raise ExportError(f"this model references backbone weights {weights['file']} (sha256 {weights['sha256']}) "
                              f"that it does not include: {hint}")
        path = Path(weights_file).expanduser()
        if not path.is_file():
            raise ExportError(f"backbone_weights: {path} is not a file; {hint}")
        if file_sha256(path) != weights["sha256"]:
            raise ExportError(f"backbone_weights: {path} has sha256 {file_sha256(path)}, the model was trained with "
                              f"{weights['file']} (sha256 {weights['sha256']}); pass that file")
        cfg.pretrained = str(path)
        backbone = backbone_from_config(cfg)
        if backbone.identity["quick_gelu"] != identity["quick_gelu"]:
            raise ExportError(f"backbone_weights: {path} builds quick_gelu={backbone.identity['quick_gelu']}, the "
                              f"model was trained with quick_gelu={identity['quick_gelu']}")
        return backbone

    def _load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy every exported tensor into the model by name (buffers too, persistent or not)."""
        own = dict(self.model.named_parameters())
        own.update(self.model.named_buffers())
        unknown = sorted(set(tensors) - set(own))
        if unknown:
            raise ExportError(f"model.safetensors: tensors {unknown[:5]} do not exist in the model config.json builds")
        with torch.no_grad():
            for name, tensor in tensors.items():
                if tensor.shape != own[name].shape:
                    raise ExportError(f"model.safetensors: {name} has shape {tuple(tensor.shape)}, the model "
                                      f"expects {tuple(own[name].shape)}")
                own[name].copy_(tensor)

    @classmethod
    def from_run(cls, run: TrainedRun | str | Path, include_backbone: bool = False) -> "EmotionModel":
        """The model of a finished run (rebuilt from what would be saved, so it checks the export)."""
        run = run if isinstance(run, TrainedRun) else load_run(run, device="cpu", precision="fp32")
        return cls(hf_config(run, include_backbone), _exported_tensors(run, include_backbone), _weights_file(run))

    @property
    def classes(self) -> tuple[str, ...]:
        return self.wheel.classes

    def fusion_weights(self) -> Optional[list[float]]:
        """Learned stage fusion weights; None where stage scores are summed (Cascade-CLIP)."""
        return self.model.fusion_weights()

    @torch.no_grad()
    def predict(self, images: Sequence[str | Path | Image.Image] | torch.Tensor) -> Prediction:
        """Top emotion and predicted distribution, as ``TrainedRun.predict`` (always fp32)."""
        if not isinstance(images, torch.Tensor):
            try:
                rgb = [to_rgb(im) if isinstance(im, Image.Image) else load_rgb(im) for im in images]
            except ImageError as e:
                raise ExportError(str(e)) from None
            images = torch.stack([self.backbone.preprocess(im) for im in rgb])
        logits = self.model.forward_stages(images.to(self.device)).logits
        probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return Prediction([self.classes[i] for i in probs.argmax(axis=1)], probs, self.classes)

    def _save_pretrained(self, save_directory: Path) -> None:
        save_directory = Path(save_directory)
        write_json(save_directory / "config.json", self.config)
        save_checkpoint(save_directory / "model.safetensors", self.tensors, self.config["backbone"]["identity"],
                        {"config_sha256": config_sha256(self.config)})
        atomic_write_text(save_directory / "README.md", model_card(self.config))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> "EmotionModel":
        """As ``huggingface_hub``'s, with a local directory's damaged ``config.json`` an ExportError
        naming it (the mixin would raise the JSON parser's error)."""
        config = Path(pretrained_model_name_or_path) / "config.json"
        if config.is_file():
            try:
                parsed = json.loads(config.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ExportError(f"{config} is unreadable or corrupt ({e}); export the run again") from None
            if not isinstance(parsed, dict):
                raise ExportError(f"{config} is not a JSON object; export the run again")
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: Optional[str], cache_dir: Optional[str | Path],
                         force_download: bool, local_files_only: bool, token: Optional[str | bool],
                         config: Optional[dict] = None, backbone_weights: Optional[str] = None,
                         device: str = "cpu") -> "EmotionModel":
        if config is None:
            raise ExportError(f"{model_id}: no config.json; not an hclafter model directory or Hub repository")
        if config.get("format") != HF_FORMAT:
            raise ExportError(f"{model_id}/config.json: format {config.get('format')!r} is not {HF_FORMAT!r}; "
                              "export the run again with `hclafter export RUN --format hf OUT`")
        if Path(model_id).is_dir():
            weights = Path(model_id) / "model.safetensors"
            if not weights.is_file():
                raise ExportError(f"{model_id}: model.safetensors is missing")
        else:
            weights = Path(hf_hub_download(repo_id=model_id, filename="model.safetensors", revision=revision,
                                           cache_dir=cache_dir, force_download=force_download,
                                           local_files_only=local_files_only, token=token))
        try:
            tensors = load_checkpoint(weights, expect={"config_sha256": (config_sha256(config),
                                                                          Path(model_id) / "config.json")})
        except CheckpointError as e:
            raise ExportError(f"{e}; export the run again") from None
        return cls(config, tensors, backbone_weights, device)


def config_sha256(config: dict) -> str:
    """The digest of an exported model's settings (as parsed: whitespace does not count)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def export_hf(run_dir: str | Path, out_dir: str | Path, include_backbone: bool = False) -> Path:
    """Write the run as a Hugging Face model directory: staged beside ``out_dir``, loaded back and
    checked to predict the run's own test images exactly as the run does, then renamed into place
    (an earlier export there is replaced; a folder holding anything else is refused)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or not {p.name for p in out.iterdir()} <= set(HF_FILES)):
        raise ExportError(f"{out} holds other files than an exported model's ({', '.join(HF_FILES)}); choose a new "
                          "or empty folder")
    run = load_run(run_dir, device="cpu", precision="fp32")
    exported = EmotionModel.from_run(run, include_backbone)
    images = check_images(run)
    expected = run.predict(images).distributions
    with staging_dir(out) as staged:
        exported.save_pretrained(staged)
        reloaded = EmotionModel.from_pretrained(staged, backbone_weights=_weights_file(run))
        got = reloaded.predict(images).distributions
        if not np.allclose(got, expected, atol=1e-6, rtol=0):
            raise ExportError(f"exported model differs from the run by {np.abs(got - expected).max():.2e}; not "
                              "written")
        replace_dir(staged, out)
    return out


def check_images(run: TrainedRun, count: int = 8) -> torch.Tensor:
    """Up to ``count`` preprocessed images of the run's test split (readable ones), else seeded noise."""
    tensors = []
    test = run.run_dir / "splits" / "test.csv"
    lines = test.read_text(encoding="utf-8").splitlines()[1:] if test.is_file() else []
    for line in lines:
        try:
            tensors.append(run.backbone.preprocess(load_rgb(line.split(",")[0], max_pixels=run.cfg.data.max_image_pixels)))
        except ImageError:
            continue
        if len(tensors) == count:
            break
    if tensors:
        return torch.stack(tensors)
    size = run.backbone.preprocess_cfg.size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return torch.randn(count, 3, *size, generator=torch.Generator().manual_seed(0))


class OnnxGraph(nn.Module):
    """What the ONNX file computes: preprocessed images → fused probabilities and per-stage logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.forward_stages(images)
        return out.logits.float().softmax(-1), out.stage_logits.float()


def onnx_bytes(model: nn.Module, example: torch.Tensor, metadata: Optional[dict[str, str]] = None) -> bytes:
    """``model`` (in eval mode) as one serialised ONNX graph with a dynamic batch axis."""
    try:
        import onnx  # noqa: F401 (the exporter needs it)
    except ImportError as e:
        raise missing_extra("ONNX export", "onnx", e) from None
    graph = OnnxGraph(model).eval()
    batch = torch.export.Dim("batch", min=1)
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter reports each of its passes
        program = torch.onnx.export(graph, (example,), None, input_names=["images"],
                                    output_names=["probabilities", "stage_logits"],
                                    dynamic_shapes={"images": {0: batch}}, opset_version=ONNX_OPSET, dynamo=True)
    proto = program.model_proto
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def write_onnx(model: nn.Module, path: str | Path, example: torch.Tensor,
               metadata: Optional[dict[str, str]] = None) -> Path:
    """Export ``model`` as an ONNX file (written atomically)."""
    atomic_write_bytes(Path(path), onnx_bytes(model, example, metadata))
    return Path(path)


def onnx_session(model: str | Path | bytes, threads: Optional[int] = None) -> Any:
    """An ONNX Runtime CPU session of a file or a serialised graph."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise missing_extra("running ONNX models", "onnx", e) from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=["CPUExecutionProvider"])


def export_onnx(run_dir: str | Path, out_path: str | Path, tolerance: float = 1e-4) -> dict[str, Any]:
    """Write the run's model as ONNX, after checking the graph in memory: its metadata, and ONNX
    Runtime on CPU against PyTorch on up to 8 test images (a larger difference than ``tolerance`` is
    an error). Only a graph that passes is written (atomically) to ``out_path``."""
    path = Path(out_path)
    run = load_run(run_dir, device="cpu", precision="fp32")
    config = hf_config(run, include_backbone=False)
    images = check_images(run)
    metadata = {"hclafter_format": "hclafter-onnx/1", "hclafter_version": __version__,
                "classes": json.dumps(config["classes"]), "preprocess": json.dumps(config["preprocess"]),
                "backbone": json.dumps(config["backbone"]["identity"]),
                "outputs": "probabilities [batch, classes] (fused, softmax); stage_logits [stages, batch, classes]"}
    graph = onnx_bytes(run.model, images[:2], metadata)
    session = onnx_session(graph)
    absent = [k for k in ONNX_METADATA if session.get_modelmeta().custom_metadata_map.get(k) != metadata[k]]
    if absent:
        raise ExportError(f"{path}: the exported graph lacks the metadata {absent}; not written")
    probs, stages = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        out = run.model.forward_stages(images)
    diff = max(float(np.abs(probs - out.logits.softmax(-1).numpy()).max()),
               float(np.abs(stages - out.stage_logits.numpy()).max()))
    if diff > tolerance:
        raise ExportError(f"{path}: ONNX Runtime differs from PyTorch by {diff:.2e} (> {tolerance:g}) on "
                          f"{len(images)} images; not written")
    atomic_write_bytes(path, graph)
    return {"path": str(path), "opset": ONNX_OPSET, "images_checked": len(images), "max_abs_diff": diff}


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "hf":
        out = export_hf(args.run_dir, args.out, include_backbone=args.include_backbone)
        print(f"Hugging Face model directory written to {out} (config.json, model.safetensors, README.md); it "
              f"predicts as the run does. Load it with hclafter.from_pretrained({str(out)!r}), push it with "
              f".push_to_hub('user/name')")
        return 0
    if args.include_backbone:
        print("error: --include-backbone applies to --format hf; an ONNX graph always contains the backbone",
              file=sys.stderr)
        return 2
    result = export_onnx(args.run_dir, args.out)
    print(f"ONNX model written to {result['path']} (opset {result['opset']}, dynamic batch); ONNX Runtime matches "
          f"PyTorch within {result['max_abs_diff']:.1e} on {result['images_checked']} test images")
    return 0
