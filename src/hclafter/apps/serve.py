"""A local web demo of a trained run (Gradio): upload an image, see the top emotions, the predicted
distribution on the emotion wheel, and what each stage predicted with its fusion weight.

Uploads are checked before decoding (size in pixels and bytes, format), so a bad file gets a
message in the page instead of an error trace; the demo listens on 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from ..core.config import MAX_IMAGE_PIXELS
from ..data.images import ImageError, ImageTooLarge, load_rgb
from ..engine.inference import TrainedRun, load_run
from .export import missing_extra

MAX_FILE_SIZE = "25mb"
POSITIVE, NEGATIVE = "#e8912d", "#3b6ea8"


def _gradio() -> Any:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local demo does not report usage
    try:
        import gradio
    except ImportError as e:
        raise missing_extra("hclafter serve", "serve", e) from None
    return gradio


def wheel_figure(classes: tuple[str, ...], probs: np.ndarray, polarity: tuple[int, ...], wheel: str) -> Figure:
    """The distribution as bars around the emotion wheel (classes in the wheel's circular order)."""
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot(projection="polar")
    angles = np.linspace(0, 2 * math.pi, len(classes), endpoint=False)
    ax.bar(angles, probs, width=2 * math.pi / len(classes) * 0.85, bottom=0.0,
           color=[POSITIVE if p else NEGATIVE for p in polarity], alpha=0.85, edgecolor="white")
    ax.set_theta_zero_location("N")
    ax.set_theta_direction(-1)
    ax.set_xticks(angles, [f"{c}\n{p:.0%}" for c, p in zip(classes, probs)], fontsize=9)
    ax.set_ylim(0, max(0.5, float(probs.max()) * 1.1))
    ax.set_yticklabels([])
    ax.set_title(f"predicted distribution on the {wheel} wheel\n(orange: positive, blue: negative)", fontsize=10)
    fig.tight_layout()
    return fig


def example_images(run: TrainedRun, count: int = 8) -> list[tuple[str, str]]:
    """(path, true label) of one test image per class, in class order, then more, up to ``count``
    files that exist."""
    test = run.run_dir / "splits" / "test.csv"
    if not test.is_file():
        return []
    with open(test, newline="", encoding="utf-8") as f:
        rows = [(r["path"], r["label"]) for r in csv.DictReader(f) if Path(r["path"]).is_file()]
    first: dict[str, tuple[str, str]] = {}
    for row in rows:
        first.setdefault(row[1], row)
    chosen = [first[c] for c in run.wheel.classes if c in first]
    chosen += [row for row in rows if row not in chosen]
    return chosen[:count]


def _display(image: Image.Image, low: int = 256, high: int = 512) -> Image.Image:
    """A copy for the page: large images shrunk, small ones enlarged without smoothing."""
    image = image.copy()
    image.thumbnail((high, high))
    factor = low // max(image.size)
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


class Analyser:
    """The demo's computation, separate from the page: checks an upload, runs the model once, and
    returns the top emotions, the wheel figure, the per-stage table and the image as classified."""

    def __init__(self, run: TrainedRun, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.run, self.max_pixels = run, max_pixels
        self.stages = getattr(run.model, "stages", None)

    def load(self, path: str) -> Image.Image:
        """The upload as RGB, or ValueError with a message for the person who uploaded it."""
        name = Path(path).name
        try:
            with Image.open(path):
                pass
        except Image.DecompressionBombError:
            raise ValueError(f"{name}: the image is too large to decode safely; upload one under "
                             f"{self.max_pixels / 1e6:.0f} megapixels") from None
        except (OSError, SyntaxError, ValueError):
            raise ValueError(f"{name} is not an image this demo can read (JPEG, PNG, WebP, BMP, GIF, TIFF ...)") \
                from None
        try:
            return load_rgb(path, max_pixels=self.max_pixels)
        except ImageTooLarge as e:
            raise ValueError(f"{name} is {e.width}×{e.height} = {e.width * e.height / 1e6:.0f} megapixels; upload one "
                             f"under {self.max_pixels / 1e6:.0f} megapixels (the model sees "
                             f"{self.run.backbone.preprocess_cfg.size} pixels anyway)") from None
        except ImageError as e:
            raise ValueError(str(e).replace(str(path), name)) from None

    @torch.no_grad()
    def __call__(self, path: str) -> tuple[dict[str, float], Figure, list[list[Any]], Image.Image]:
        image = self.load(path)
        model, wheel = self.run.model, self.run.wheel
        device = next(model.parameters()).device
        out = model.forward_stages(self.run.backbone.preprocess(image)[None].to(device))
        probs = torch.softmax(out.logits.float(), -1)[0].cpu().numpy()
        stage_probs = torch.softmax(out.stage_logits.float(), -1)[:, 0].cpu().numpy()
        weights = model.fusion_weights()
        rows = []
        for s, p in enumerate(stage_probs):
            layers = ", ".join(map(str, self.stages[s])) if self.stages else ""
            rows.append([f"stage {s + 1}", layers, round(weights[s], 4) if weights else None,
                         wheel.classes[int(p.argmax())], round(float(p.max()), 4)])
        rows.append(["fused", "", None, wheel.classes[int(probs.argmax())], round(float(probs.max()), 4)])
        top = {c: float(p) for c, p in zip(wheel.classes, probs)}
        return top, wheel_figure(wheel.classes, probs, wheel.polarity, wheel.name), rows, _display(image)


def build_app(run: TrainedRun, max_pixels: int = MAX_IMAGE_PIXELS) -> Any:
    """The Gradio page of ``run``; its one API endpoint is ``/predict`` (an image file in)."""
    gr = _gradio()
    analyse = Analyser(run, max_pixels)

    def predict(path: Optional[str]):
        if path is None:  # the upload was cleared: so are the results
            return None, None, None, None
        try:
            return analyse(path)
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False) from None

    method, data = run.cfg.model.method, run.cfg.data.format
    note = ("\n\n**Synthetic world:** this run was trained on hclafter's drawn emotion images; its predictions "
            "on photographs mean nothing." if data == "synthetic" else "")
    with gr.Blocks(title=f"hclafter: {run.run_dir.name}") as app:
        gr.Markdown(f"## hclafter: {run.run_dir.name}\nMethod `{method}`, trained on `{data}` "
                    f"({run.wheel.name}: {', '.join(run.wheel.classes)}).{note}")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Upload an image", file_types=["image"], type="filepath")
                examples = example_images(run)
                if examples:
                    gr.Examples([[path] for path, _ in examples], inputs=[upload],
                                example_labels=[f"{label} ({Path(path).name})" for path, label in examples],
                                label="Test-split examples (true label)")
                shown = gr.Image(label="As classified", type="pil", interactive=False, height=256)
            with gr.Column():
                top = gr.Label(label="Top emotions", num_top_classes=3)
                wheel = gr.Plot(label="Emotion wheel")
                stages = gr.Dataframe(headers=["stage", "layers", "fusion weight", "top emotion", "probability"],
                                      label="Per-stage predictions", interactive=False)
        upload.change(predict, inputs=upload, outputs=[top, wheel, stages, shown], api_name="predict")
    return app


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 7860, device: Optional[str] = None,
          max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Serve the demo until interrupted."""
    _gradio()  # fail before loading the model when the extra is missing
    run = load_run(run_dir, device=device, precision="fp32")
    app = build_app(run, max_pixels)
    allowed = sorted({str(Path(path).parent) for path, _ in example_images(run)})
    app.launch(server_name=host, server_port=port, max_file_size=MAX_FILE_SIZE, allowed_paths=allowed,
               show_error=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from .runs import check_device_flags

    check_device_flags(args)
    serve(args.run_dir, args.host, args.port, args.device)
    return 0
