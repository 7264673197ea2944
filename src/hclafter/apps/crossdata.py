"""Cross-dataset evaluation: a finished run on another dataset (SPEC §10).

Sources disagree on class order, so classes are matched by name, never by index: a dataset whose
classes are all among the run's (FI, EmoSet, ArtPhoto on Mikels-8) is scored in its own label
space, with the run's logits of its classes. Otherwise, when both label spaces have positive and
negative classes (Mikels-8, Ekman-6, Twitter), predictions and labels are mapped to polarity: the
predicted polarity is the one with the larger summed probability. Anything else is refused, since
any score it gave would rest on a mapping that does not exist.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy.special import logsumexp

from ..core.config import Config, ConfigError, DataConfig, load_config
from ..core.emotions import POLARITY2, Wheel
from ..core.files import RunError
from ..core.runtime import cache_dir_of
from ..data import READERS, DataError, eval_loader, load_splits, make_dataset
from ..data.splits import resolve_wheel
from ..engine import runfiles
from ..engine.evaluation import Classify, Predictions, compute_metrics, predict
from ..engine.inference import TrainedRun
from ..reporting.evidence import random_backbone

__all__ = ["BY_NAME", "BY_POLARITY", "ClassMapping", "MappingError", "class_mapping", "cross_dataset_config",
           "describe_result", "evaluate_on"]

BY_NAME, BY_POLARITY = "by name", "by polarity"
# Data keys that describe one dataset: a new --data dataset starts without the run's values.
DATASET_KEYS = ("splits_dir", "label_space", "wheel_file", "few_shot")


class MappingError(DataError):
    """The run's classes cannot be mapped onto the dataset's, neither by name nor by polarity."""


@dataclass(frozen=True)
class ClassMapping:
    """How the run's outputs (``source`` classes) are scored against a dataset's labels (``target``)."""

    kind: str  # BY_NAME | BY_POLARITY
    source: Wheel
    target: Wheel
    columns: tuple[int, ...] = ()  # by name: the run's logit column of each target class

    @property
    def wheel(self) -> Wheel:
        """The label space the metrics are computed in."""
        return self.target if self.kind == BY_NAME else POLARITY2

    def logits(self, logits: np.ndarray) -> np.ndarray:
        """[..., C_run] → [..., C_eval]: the target classes' columns, or log summed probability per
        polarity (so softmax gives the summed probabilities and argmax the larger one)."""
        if self.kind == BY_NAME:
            return logits[..., list(self.columns)]
        positive = np.array(self.source.polarity, dtype=bool)
        log_p = logits - logsumexp(logits, axis=-1, keepdims=True)
        return np.stack([logsumexp(log_p[..., positive], axis=-1), logsumexp(log_p[..., ~positive], axis=-1)],
                        axis=-1)

    def apply(self, preds: Predictions) -> Predictions:
        """The run's predictions on target-labelled data, in the evaluation label space."""
        stage = None if preds.stage_logits is None else self.logits(preds.stage_logits)
        if self.kind == BY_NAME:
            return Predictions(self.logits(preds.logits), stage, preds.labels, preds.distributions, preds.indices)
        positive = np.array(self.target.polarity, dtype=bool)
        labels = np.where(positive[preds.labels], 0, 1)  # POLARITY2: positive, negative
        dists = np.stack([preds.distributions[:, positive].sum(1), preds.distributions[:, ~positive].sum(1)], axis=1)
        return Predictions(self.logits(preds.logits), stage, labels, dists, preds.indices)


def _polarity_problem(wheel: Wheel, side: str) -> Optional[str]:
    kinds = set(wheel.polarity)
    if kinds == {0, 1}:
        return None
    missing = "negative" if 1 in kinds else "positive"
    return f"the {side} label space {wheel.name} has no {missing} class"


def class_mapping(source: Wheel, target: Wheel) -> ClassMapping:
    """By name when every target class is one of the run's, else by polarity when both label spaces
    have positive and negative classes; MappingError otherwise."""
    columns, unknown = [], []
    for name in target.classes:
        try:
            columns.append(source.index(name))
        except KeyError:
            unknown.append(name)
    if not unknown:
        return ClassMapping(BY_NAME, source, target, tuple(columns))
    problems = [p for p in (_polarity_problem(source, "run's"), _polarity_problem(target, "dataset's")) if p]
    if not problems:
        return ClassMapping(BY_POLARITY, source, target)
    raise MappingError(
        f"cannot map the run's classes ({source.name}: {', '.join(source.classes)}) onto the dataset's "
        f"({target.name}: {', '.join(target.classes)}): not by name, as {', '.join(unknown)} "
        f"{'is' if len(unknown) == 1 else 'are'} not among the run's classes, and not by polarity, as "
        f"{' and '.join(problems)}. Evaluate on a dataset whose classes the run knows by name, or whose label "
        "space has positive and negative classes (data.label_space, or polarity in data.wheel_file)")


def cross_dataset_config(run_dir: str | Path, data: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """The run's config with another dataset: ``data`` is FORMAT:ROOT (an empty ROOT: none, e.g.
    ``synthetic:``), which also drops the run's dataset-specific keys (DATASET_KEYS); ``overrides``
    are ``data.*`` (or ``cache_dir``) key=value settings on top. The model's settings stay the run's."""
    if not (Path(run_dir) / runfiles.CONFIG).is_file():
        raise RunError(f"{run_dir} is not a finished run: {runfiles.CONFIG} is missing")
    for item in overrides:
        if not item.startswith(("data.", "cache_dir=")):
            raise ConfigError(f"eval: override {item!r} does not apply; evaluating a finished run takes only data.* "
                              "overrides (and cache_dir), as the model is the run's own (RUN/config.yaml)")
    given: list[str] = []
    if data is not None:
        fmt, _, root = data.partition(":")
        if not fmt:
            raise ConfigError(f"--data {data!r}: expected FORMAT:ROOT, e.g. fi:/data/FI or synthetic: "
                              "(synthetic data needs no root)")
        given = [f"data.format={fmt}", f"data.root={root or 'null'}", *(f"data.{k}=null" for k in DATASET_KEYS)]
    return load_config([Path(run_dir) / runfiles.CONFIG], [*given, *overrides])


def _dataset_info(cfg: DataConfig, wheel: Wheel) -> dict:
    info = {"format": cfg.format, "root": cfg.root, "label_space": wheel.name}
    if cfg.format == "synthetic":
        info.update(per_class=cfg.synthetic.per_class, image_size=cfg.synthetic.image_size, seed=cfg.synthetic.seed)
        if cfg.wheel_file is None and wheel.name == "mikels8":
            info["world"] = cfg.synthetic.world
    return info


def _classify(run: TrainedRun) -> Classify:
    def classify(images):
        with run.runtime.autocast():
            out = run.model.forward_stages(images)
        return out.logits, out.stage_logits

    return classify


def evaluate_on(run: TrainedRun, data_cfg: DataConfig, split: str = "test", cache_dir: Optional[Path] = None,
                progress: bool = True) -> dict:
    """Metrics of ``run`` on one split of another dataset, with the class mapping used.

    The dataset is read and split as training would (the run's seed; ``cache_dir`` defaults to the
    run's) and scored in its own label space (``by name``) or in positive/negative (``by polarity``).
    """
    if data_cfg.format != "synthetic" and data_cfg.format not in READERS:
        raise DataError(f"--data / data.format: unknown format {data_cfg.format!r}; available: synthetic, "
                        f"{', '.join(READERS)}")
    # Checked before any data is read or generated; load_splits gives the data this label space.
    mapping = class_mapping(run.wheel, POLARITY2 if data_cfg.polarity else resolve_wheel(data_cfg))
    data = load_splits(data_cfg, run.cfg.seed, cache_dir or cache_dir_of(run.cfg))
    dataset = make_dataset(data[split], data.wheel, run.backbone.preprocess, data_cfg)
    raw = predict(_classify(run), eval_loader(dataset, data_cfg, run.runtime), run.runtime, progress=progress)
    return {"run": str(run.run_dir), "random_init": random_backbone(run.run_dir), "mapping": mapping.kind,
            "run_label_space": run.wheel.name, "label_space": mapping.wheel.name,
            "classes": list(mapping.wheel.classes), "dataset": _dataset_info(data_cfg, data.wheel), "split": split,
            "num_images": len(dataset), "skipped_inputs": len(data.skipped),
            "metrics": compute_metrics(mapping.apply(raw), mapping.wheel)}


def describe_result(result: dict) -> str:
    """The header lines of a cross-dataset result: what was evaluated, on what, mapped how."""
    d = result["dataset"]
    where = d["root"] or (f"world {d['world']}" if "world" in d else "generated")
    lines = [f"run:      {result['run']} ({result['run_label_space']})",
             f"dataset:  {d['format']} ({where}; {d['label_space']}), {result['split']} split, "
             f"{result['num_images']} images" + (f", {result['skipped_inputs']} skipped" if result["skipped_inputs"]
                                                 else ""),
             f"mapping:  {result['mapping']} -> scored in {result['label_space']} ({', '.join(result['classes'])})"]
    if result["random_init"]:
        lines.append("note:     the run's backbone is random-initialised: these numbers mean nothing")
    return "\n".join(lines)
