"""Typed run configuration: dataclasses merged from YAML files and ``key.sub=value`` overrides.

OmegaConf structured configs give type checking and reject unknown keys, so a typo in a
config file or an override fails before any data is read or model built.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

MAX_IMAGE_PIXELS = 50_000_000  # data.max_image_pixels by default (≈ 150 MB as RGB)
# Training groups; a model assigns each parameter to one (baselines add projections and decoders).
PARAM_GROUPS = ("prompts", "layernorms", "classifier", "stage_adapters", "fusion", "nga", "mixer", "layer_weights",
                "projections", "decoders", "backbone")


@dataclass
class BackboneConfig:
    name: str = "ViT-B-32"
    # A local weights file (OpenAI JIT archive, OpenAI/open_clip state dict, .safetensors) or an
    # open_clip pretrained tag (needs network access). None: random initialisation, which train,
    # eval and zeroshot refuse unless random_init is true (a forgotten weights file is a mistake).
    pretrained: Optional[str] = None
    # None: automatic (QuickGELU for OpenAI weights, as they were trained with it).
    quick_gelu: Optional[bool] = None
    # A full open_clip model config (embed_dim, vision_cfg, text_cfg) for architectures that are
    # not built in, e.g. the tiny test models. `name` then only labels it.
    model_cfg: Optional[dict[str, Any]] = None
    init_seed: int = 0
    random_init: bool = False  # tests, benchmarks and toy runs: a backbone without weights is intended


@dataclass
class ModelConfig:
    method: str = "hybrid"  # a name registered in hclafter.models.METHODS (see configs/methods/), checked there
    aggregation: str = "nga"  # nga | mean (the "w/o NGA" ablation: uniform weights, no σ)
    prompt_tokens: int = 50
    prompt_dropout: float = 0.0
    stages: list[list[int]] = field(default_factory=lambda: [[5, 6, 7], [8, 9], [10, 11, 12]])
    nga_init_sigma: float = 1.0
    stage_adapters: bool = True
    shared_adapter: bool = False  # one adapter for every stage (the capacity ablation) instead of one each
    # Beyond the seed (SPEC §10), off by default. static: learned weights softmax(β); adaptive: per-image
    # weights from a gate over the stage features, starting at the static ones.
    fusion: str = "static"
    # none, or attention: the stage features attend to each other (residual, identity at start).
    stage_mixer: str = "none"
    mixer_heads: int = 4
    # Legacy behaviour of the reference code: feed un-normalised image features to the classifier.
    normalize_features: bool = True
    stage_prompt_tokens: int = 16  # segmented: new prompt tokens inserted at each stage's first block
    decoder_layers: int = 3  # cascadeclip: cross-attention layers per stage decoder
    decoder_heads: int = 8
    context_tokens: int = 16  # coop: learned context vectors before the class name
    class_specific_context: bool = False  # coop: one context per class (CoOp's CSC) instead of one shared
    # clip_adapter: the residual ratio it trains with (the paper's 0.2); its predictions use the ratio chosen on
    # the validation split after each epoch.
    adapter_ratio: float = 0.2


@dataclass
class DistributionConfig:
    source: str = "wheel"  # wheel: strategy1 from the label; dataset: the images' own vote distributions
    sigma: float = 1.0
    epsilon: float = 0.1
    exclusion: bool = False


@dataclass
class SyntheticConfig:
    per_class: int = 40
    image_size: int = 64
    seed: int = 0
    # Mikels-8 images: a named world of resources/worlds/ (or a world YAML file): the nuisances the
    # images are taken under. "wild" is the original demo data; the demo itself defaults to "mixed".
    world: str = "wild"


@dataclass
class DataConfig:
    # synthetic | manifest | imagefolder | fi | emoset | emotion6 | twitter1 | twitter2 | artphoto |
    # abstract | flickrldl | twitterldl
    format: str = "synthetic"
    root: Optional[str] = None
    label_space: Optional[str] = None  # mikels8 | ekman6 | polarity2; None: the format's own
    wheel_file: Optional[str] = None  # a custom wheel (YAML/JSON), replacing label_space
    polarity: bool = False  # train and evaluate on 2-class positive/negative labels derived from the classes
    emotion6_label: str = "folder"  # Emotion6 label: keyword folder, or argmax of the votes
    ties: str = "skip"  # vote-derived labels with a tie: skip the image (counted) or take the first class
    few_shot: Optional[int] = None  # images per class kept in train
    splits_dir: Optional[str] = None  # re-use a run's splits/ folder instead of splitting again
    skip_invalid: bool = False  # skip bad inputs (counted, listed in summary.json) instead of stopping
    verify_images: bool = True  # decode every image once before training, to find unreadable files
    # train / val / test fractions for datasets without an official split.
    split_ratios: list[float] = field(default_factory=lambda: [0.8, 0.05, 0.15])
    batch_size: int = 32
    eval_batch_size: int = 64
    # Images of more pixels than this, after a JPEG's reduced decoding (PIL draft), are refused as
    # too_large bad inputs (counted in summary.json's skipped): decoding them whole costs gigabytes.
    max_image_pixels: int = MAX_IMAGE_PIXELS
    num_workers: int = 0
    # true: decode each image once, on first use, into the pre-decoded image store (cache_dir/images,
    # see data/store.py) and read batches from it; false (or off): decode the files in every epoch.
    image_store: bool = True
    # Labelled training's view: none (the evaluation view), or crop_flip (random crop from a
    # slightly larger resize, random horizontal flip).
    train_augment: str = "none"
    distribution: DistributionConfig = field(default_factory=DistributionConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TextConfig:
    """Stage 1: the text-only classifier."""

    descriptions: Optional[str] = None  # JSON {class: [sentence, ...]}; None: the shipped corpus
    templates: Optional[list[str]] = None  # None: the shipped templates of the label space
    steps: int = 500
    lr: float = 1e-3
    weight_decay: float = 0.01
    noise_std: float = 0.1
    label_smoothing: float = 0.1
    balance_classes: bool = False
    batch_size: int = 256  # encoding batch only; training is full-batch


@dataclass
class LossConfig:
    name: str = "dual_task"  # ce | ls_ce | dual_task
    label_smoothing: float = 0.1
    lam: float = 0.8
    temperature: float = 1.0


@dataclass
class DistillConfig:
    """Stage distillation (SPEC §10): a teacher's predictions guide every stage."""

    # None: off. "fused": the model's own detached fused prediction (self-distillation); or the path of a
    # finished run, whose predictions on the training images are computed once and cached.
    teacher: Optional[str] = None
    weight: float = 1.0
    temperature: float = 2.0


@dataclass
class PhaseConfig:
    # The phase's length in passes over the training set; with train.steps, its share of the step budget
    # (the phases' epochs are then proportions: 3, 3, 2 give 3/8, 3/8 and 2/8 of the steps).
    epochs: int = 1
    train: list[str] = field(default_factory=list)
    consistency: bool = False
    # Only these stages' own parameters (1-based) of the listed groups train; shared ones always
    # do. None: all stages. Gives progressive unfreezing (e.g. the segmented baseline).
    stages: Optional[list[int]] = None


def phase_groups(phase: PhaseConfig, train_backbone: bool) -> set[str]:
    """The groups a phase trains: its list, plus the tower's other weights with ``train_backbone``."""
    groups = set(phase.train)
    if train_backbone and "layernorms" in groups:
        groups.add("backbone")
    return groups


def _default_phases() -> list[PhaseConfig]:
    first = ["stage_adapters", "fusion"]
    every = first + ["nga", "prompts", "layernorms", "classifier"]
    return [PhaseConfig(3, first, False), PhaseConfig(3, every, False), PhaseConfig(2, every, True)]


@dataclass
class TrainConfig:
    """Stage 2: image tuning."""

    lr: dict[str, float] = field(
        default_factory=lambda: {
            "prompts": 1e-4, "layernorms": 1e-4, "classifier": 1e-4,
            "stage_adapters": 1e-4, "fusion": 1e-4, "nga": 1e-5, "mixer": 1e-4, "projections": 1e-4, "decoders": 1e-4,
            # Cascade-CLIP's unnormalised layer weights (the reference trains them at about 2e-4)
            "layer_weights": 2e-4,
            "backbone": 1e-5,
        }
    )
    weight_decay: float = 0.01
    # The budget: None trains every phase for its epochs; a number of optimizer steps in all splits them
    # among the phases in proportion to their epochs (phase_steps) and validates at least every tenth of them.
    steps: Optional[int] = None
    # Linear warm-up over this many epochs' worth of steps (either budget), then cosine decay to 0 at the last step.
    warmup_epochs: float = 0.5
    phases: list[PhaseConfig] = field(default_factory=_default_phases)
    # Also tune the non-LayerNorm image-tower weights whenever `layernorms` is trained.
    train_backbone: bool = False
    loss: LossConfig = field(default_factory=LossConfig)
    consistency_weight: float = 0.1
    distill: DistillConfig = field(default_factory=DistillConfig)
    # The resumable state is saved at the end of a phase, when validation improves (the best weights are written
    # then), at a round's end once this many seconds have passed since the last save (0: after every round: a
    # save costs about as much as a validation), on SIGINT/SIGTERM and, if > 0, every checkpoint_every_steps steps.
    state_every_s: float = 60.0
    checkpoint_every_steps: int = 0
    on_nonfinite: str = "stop"  # stop: keep the last good state and exit; skip: skip the batch and count it
    # labels: supervised by the dataset's labels (and distributions). pseudo: LaFTer's label-free mode,
    # where the frozen stage-1 classifier labels plain CLIP features of a weak view and the model
    # learns from a strongly augmented view (loss ce or ls_ce); the training labels are never read.
    supervision: str = "labels"
    pseudo_threshold: float = 0.0  # pseudo: ignore images whose teacher confidence is below this
    # A torch.compile backend for the training steps (inductor: pays on a GPU over long runs; each
    # phase compiles once), or None for eager execution.
    compile: Optional[str] = None
    # Encode each image once and reuse its layer features when the image tower cannot change
    # (no prompts, no LayerNorm or backbone tuning, labels supervision): see engine/inputs.py.
    feature_cache: bool = True
    # Experiment trackers (accelerate's), writing under the run's logs/: tensorboard, wandb (offline),
    # mlflow (a file store); [] for none.
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])


TRACKERS = ("tensorboard", "wandb", "mlflow")


@dataclass
class SearchRange:
    """One tuned setting: a numeric range (``low`` to ``high``, on a log scale with ``log``), or a
    list of ``choices``. ``key`` is the setting as an override names it (``train.lr.prompts``)."""

    key: str = "???"
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    choices: Optional[list[float]] = None


def _hybrid_space() -> list[SearchRange]:
    lr = [SearchRange(f"train.lr.{group}", 1e-5, 1e-2, True) for group in
          ("prompts", "layernorms", "classifier", "stage_adapters")]
    return [*lr, SearchRange("train.lr.fusion", 1e-4, 1e-1, True), SearchRange("train.lr.nga", 1e-5, 1e-1, True),
            SearchRange("train.weight_decay", 1e-4, 1e-1, True), SearchRange("train.loss.lam", 0.0, 1.0),
            SearchRange("train.loss.temperature", 0.5, 4.0, True), SearchRange("train.consistency_weight", 0.0, 1.0),
            SearchRange("model.prompt_tokens", choices=[10, 25, 50])]


@dataclass
class TuneConfig:
    """``hclafter tune`` (Optuna): what it searches and what it maximises. A method config declares
    its own ``space`` (a list, so a later file's replaces an earlier one's; the default is the
    hybrid's); the validation split is the only one a trial is scored on."""

    objective: str = "accuracy"  # the validation figure maximised: accuracy | macro_f1
    space: list[SearchRange] = field(default_factory=_hybrid_space)
    # Trials sampled at random before TPE models the space, and finished before the pruner compares a trial's
    # validations with theirs.
    startup_trials: int = 5
    pruner: str = "median"  # median: stop a trial whose validation is below the median of earlier ones at that step
    # Share of a trial's optimizer steps before the pruner may stop it: a run validates every pass over the
    # training set (hundreds of times in a converged run), and its first phases train only part of the model.
    warmup: float = 0.5
    # Finished trials before the report estimates parameter importances (fANOVA): fewer give noise.
    importance_trials: int = 10


def phase_steps(train: TrainConfig, steps_per_epoch: int) -> list[int]:
    """Optimizer steps of each phase: its epochs times ``steps_per_epoch``, or, with ``train.steps``,
    the budget split in proportion to the phases' epochs. Phase k then ends at step
    round(steps × (epochs of phases 1..k) / (all epochs)) (halves round up), so the shares sum to the
    budget exactly, and a budget of as many steps as the epochs give puts every phase end where the
    epochs put it. A phase whose share rounds to zero is a ConfigError naming the numbers."""
    epochs = [p.epochs for p in train.phases]
    if train.steps is None:
        return [e * steps_per_epoch for e in epochs]
    shares = _split(train.steps, epochs)
    if min(shares) < 1:
        least = next(n for n in itertools.count(len(epochs)) if min(_split(n, epochs)) >= 1)
        raise ConfigError(f"train.steps={train.steps} gives phase {shares.index(0) + 1} no steps: the phases' "
                          f"epochs {':'.join(map(str, epochs))} split it into {shares}; give at least {least} steps")
    return shares


def _split(steps: int, epochs: Sequence[int]) -> list[int]:
    total, ends, done = sum(epochs), [], 0
    for e in epochs:
        done += e
        ends.append((2 * steps * done + total) // (2 * total))
    return [b - a for a, b in zip([0, *ends], ends)]


def tuned_groups(train: TrainConfig) -> set[str]:
    """The groups any phase trains: they get an optimizer entry, are saved with the run, and count
    as trained parameters."""
    return set().union(*(phase_groups(p, train.train_backbone) for p in train.phases))


@dataclass
class Config:
    # train: stage 1 + stage 2. zeroshot / textonly: evaluate zero-shot CLIP or the stage-1 text
    # classifier on image features, without image training (the baselines of the tables).
    mode: str = "train"
    name: Optional[str] = None  # the method's name in tables and reports (the method configs set it)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16
    cache_dir: Optional[str] = None  # text-embedding and synthetic-data cache; None: ~/.cache/hclafter
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


class ConfigError(ValueError):
    """A configuration problem, reported with the offending key or file."""


def _with_includes(paths: Sequence[str | Path], seen: tuple[Path, ...] = ()) -> list[Path]:
    """Config files in merge order: a file's ``include: [other.yaml, ...]`` (relative to it) first."""
    out: list[Path] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        if path.resolve() in seen:
            raise ConfigError(f"{path}: includes itself (through {' -> '.join(p.name for p in seen)})")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: {_error_line(e)}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path}: not a YAML mapping of settings (key: value lines)")
        includes = (data or {}).get("include", [])
        out += _with_includes([path.parent / p for p in ([includes] if isinstance(includes, str) else includes)],
                              (*seen, path.resolve()))
        out.append(path)
    return out


# Keys that name files or folders; relative values are anchored where they were written.
PATH_KEYS = ("backbone.pretrained", "data.root", "data.splits_dir", "data.wheel_file", "text.descriptions", "cache_dir")
WEIGHTS_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def looks_like_path(value: str) -> bool:
    """Whether a ``backbone.pretrained`` value means a file rather than an open_clip tag."""
    return any(s in value for s in ("/", "\\")) or Path(value).suffix in WEIGHTS_SUFFIXES


def _anchor_paths(node: DictConfig, base: Path, keys: Sequence[str] = PATH_KEYS) -> None:
    """Make the relative paths of ``keys`` in ``node`` absolute against ``base``: the folder of the
    config file that set them, or the working directory for command-line overrides. Anchored at load
    time, a config means the same files from any directory, and a missing file is reported as missing
    (a weights path left relative could be taken for an open_clip tag)."""
    for key in keys:
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(node, parent_key) if parent_key else node
        if not isinstance(parent, DictConfig) or leaf not in parent or OmegaConf.is_missing(parent, leaf) \
                or OmegaConf.is_interpolation(parent, leaf):
            continue
        value = parent[leaf]
        if not isinstance(value, str) or not value:
            continue
        path = base / Path(value).expanduser()
        if key == "backbone.pretrained" and not looks_like_path(value) and not path.exists():
            continue  # an open_clip tag such as 'openai'
        parent[leaf] = str(path.resolve())


def _error_line(e: Exception, located: bool = True) -> str:
    """An OmegaConf or YAML error on one line, led by the key (OmegaConf appends the full key and
    types on more lines, YAML a picture of the line)."""
    if isinstance(e, yaml.YAMLError):
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None and located else ""
        return f"not valid YAML{where} ({' '.join(str(getattr(e, 'problem', None) or e).split())})"
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text ({e})"
    message = str(getattr(e, "msg", e)).strip().splitlines()[0]
    key = getattr(e, "full_key", None)
    return f"{key}: {message}" if key else message


def _check_indices(node: Any, key: str) -> None:
    """A list entry that an override names must exist (OmegaConf would complain that an empty mapping
    is not a valid entry)."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, ListConfig) and part.isdigit():
            if int(part) >= len(node):
                raise ConfigError(f"{'.'.join(parts[:i])} has {len(node)} entries, numbered from 0; there is no "
                                  f"entry {part}")
            node = node[int(part)]
        elif isinstance(node, DictConfig) and part in node:
            node = node[part]
        else:
            return


@functools.cache
def _defaults() -> DictConfig:
    """The typed defaults, built once: OmegaConf takes about 60 ms to build them, 8 to copy them."""
    return OmegaConf.structured(Config)


def load_config(paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> Config:
    """Merge YAML files (later ones win) and ``key.sub=value`` overrides onto the defaults; an
    override may name a list entry by its index (``train.phases.0.epochs=1``).

    Relative paths (``PATH_KEYS``) are relative to the config file that sets them, and to the
    working directory on the command line; the config returned holds absolute paths. Every problem
    is one ConfigError line that names the file or the override (key and value)."""
    merged = copy.deepcopy(_defaults())
    required: set[str] = set()  # keys a file marks '???': the user must supply them
    for path in _with_includes(paths):
        try:
            loaded = OmegaConf.load(path)
            loaded.pop("include", None)
            _anchor_paths(loaded, path.parent)
            required |= OmegaConf.missing_keys(loaded)
            merged = OmegaConf.merge(merged, loaded)
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: {_error_line(e)}") from None
    for item in overrides:
        key, _, value = item.partition("=")
        if "=" not in item or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            _check_indices(merged, key)
            merged.merge_with_dotlist([item])
            _anchor_paths(merged, Path.cwd(), [k for k in PATH_KEYS if k == key or k.startswith(f"{key}.")])
        except ConfigError as e:
            raise ConfigError(f"override {key}={value}: {e}") from None
        except (OmegaConfBaseException, yaml.YAMLError, TypeError) as e:  # TypeError: a list index that is no number
            raise ConfigError(f"override {key}={value}: {_error_line(e, located=False)}") from None
    missing = sorted(k for k in required | OmegaConf.missing_keys(merged) if OmegaConf.select(merged, k) in (None, "???"))
    if missing:
        raise ConfigError(f"no value given for {', '.join(missing)}: set it in a config file or as key=value")
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    try:
        validate(cfg)
    except ConfigError as e:  # say where the settings came from (a damaged run config.yaml, ...)
        if not paths:
            raise
        where = ", ".join(map(str, paths)) + (" and the overrides" if overrides else "")
        raise ConfigError(f"{where}: {e}") from None
    return cfg


CHOICES = {
    "mode": ("train", "zeroshot", "textonly"), "precision": ("fp32", "bf16", "fp16"), "device": ("auto", "cpu", "cuda"),
    "train.supervision": ("labels", "pseudo"),
    "model.aggregation": ("nga", "mean"),
    "model.fusion": ("static", "adaptive"), "model.stage_mixer": ("none", "attention"),
    "train.loss.name": ("ce", "ls_ce", "dual_task"), "train.on_nonfinite": ("stop", "skip"),
    "data.emotion6_label": ("folder", "argmax"), "data.ties": ("skip", "first"),
    "data.distribution.source": ("wheel", "dataset"), "data.train_augment": ("none", "crop_flip"),
    "tune.objective": ("accuracy", "macro_f1"), "tune.pruner": ("median", "none"),
}
SEEDS = 2**32 - 1  # NumPy's generators take seeds below 2**32
# Every numeric setting: key (``*``: every entry of a mapping or list) → (lowest allowed, whether it is
# allowed, highest or None, whether it is allowed). Upper bounds keep sizes within what fits in memory
# and time (a typo of a few zeros would otherwise end in an allocation error or a run of days); floats
# must be finite. README.md ("Settings and their ranges") lists them all.
RANGES: dict[str, tuple[float, bool, Optional[float], bool]] = {
    "seed": (0, True, SEEDS, True), "backbone.init_seed": (0, True, SEEDS, True),
    "model.prompt_tokens": (0, True, 4096, True), "model.prompt_dropout": (0, True, 1, False),
    "model.stages.*.*": (1, True, None, True),  # and within the backbone's blocks: models.check_config
    "model.nga_init_sigma": (0, False, None, True), "model.mixer_heads": (1, True, 256, True),
    "model.stage_prompt_tokens": (1, True, 4096, True), "model.decoder_layers": (1, True, 64, True),
    "model.decoder_heads": (1, True, 256, True), "model.context_tokens": (1, True, 4096, True),
    "model.adapter_ratio": (0, True, 1, True),
    "data.few_shot": (1, True, None, True), "data.split_ratios.*": (0, True, 1, True),
    "data.batch_size": (1, True, None, True), "data.eval_batch_size": (1, True, None, True),
    "data.num_workers": (0, True, 256, True), "data.max_image_pixels": (1, True, None, True),
    "data.distribution.sigma": (0, False, None, True), "data.distribution.epsilon": (0, True, None, True),
    "data.synthetic.per_class": (1, True, 100_000, True), "data.synthetic.image_size": (8, True, 4096, True),
    "data.synthetic.seed": (0, True, SEEDS, True),
    "text.steps": (0, True, 1_000_000, True), "text.lr": (0, False, None, True),
    "text.weight_decay": (0, True, None, True), "text.noise_std": (0, True, None, True),
    "text.label_smoothing": (0, True, 1, False), "text.batch_size": (1, True, None, True),
    "train.lr.*": (0, False, None, True), "train.weight_decay": (0, True, None, True),
    "train.warmup_epochs": (0, True, None, True), "train.phases.*.epochs": (1, True, 100_000, True),
    "train.phases.*.stages.*": (1, True, None, True),  # and at most the number of stages: below
    "train.steps": (1, True, 10_000_000, True),
    "train.consistency_weight": (0, True, None, True), "train.distill.weight": (0, True, None, True),
    "train.distill.temperature": (0, False, None, True), "train.checkpoint_every_steps": (0, True, None, True),
    "train.state_every_s": (0, True, None, True),
    "train.loss.lam": (0, True, 1, True), "train.loss.temperature": (0, False, None, True),
    "train.loss.label_smoothing": (0, True, 1, False), "train.pseudo_threshold": (0, True, 1, True),
    # A search range's bounds and choices lie within the tuned setting's own range: checked in validate.
    "tune.space.*.low": (-math.inf, False, None, True), "tune.space.*.high": (-math.inf, False, None, True),
    "tune.space.*.choices.*": (-math.inf, False, None, True),
    "tune.startup_trials": (0, True, 100_000, True), "tune.warmup": (0, True, 1, True),
    "tune.importance_trials": (2, True, None, True),
}
# Sections that never change what a run computes (what hclafter tune searches, and how): a run's recorded settings
# are compared without them, so a run made before they existed, or under another search space, is the same run.
RUN_NEUTRAL = ("tune",)
# What a trial may change: how a method is built and trained, not the data (which images are validation), the
# seeds or the backbone.
TUNABLE = ("model.", "text.", "train.", "data.batch_size", "data.distribution.")


def _get(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def values_at(node: Any, key: str, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(key, value) of every setting a RANGES key names, with each ``*`` spelled out as the entry's
    key or index (as an override would name it)."""
    head, _, rest = key.partition(".")
    if head == "*":
        entries = node.items() if isinstance(node, dict) else enumerate(node or [])
    else:
        entries = [(head, getattr(node, head))]
    for name, child in entries:
        if rest:
            yield from values_at(child, rest, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", child


def range_text(low: float, low_in: bool, high: Optional[float], high_in: bool) -> str:
    start = "-∞" if low == -math.inf else low
    return f"{'[' if low_in else '('}{start}, {'∞)' if high is None else f'{high}' + (']' if high_in else ')')}"


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def setting_kind(cfg: Config, key: str) -> Optional[type]:
    """int or float for a key that names a numeric setting of ``cfg`` (mapping entries and list
    indices included: ``train.lr.prompts``, ``train.phases.0.epochs``), else None."""
    node: Any = cfg
    hint: Any = Config
    for part in key.split("."):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is typing.Union and len(options) == 1:
            hint = options[0]
        origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint) and part in {f.name for f in dataclasses.fields(hint)}:
            hint, node = _type_hints(hint)[part], getattr(node, part)
        elif origin is dict and isinstance(node, dict) and part in node:
            hint, node = typing.get_args(hint)[1], node[part]
        elif origin is list and part.isdigit() and int(part) < len(node or []):
            hint, node = typing.get_args(hint)[0], node[int(part)]
        else:
            return None
    options = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(options) == 1:
        hint = options[0]
    return hint if hint in (int, float) else None


def _range_of(key: str) -> tuple[float, bool, Optional[float], bool]:
    parts = key.split(".")
    return next(bounds for pattern, bounds in RANGES.items() if len(pattern.split(".")) == len(parts)
                and all(p in ("*", k) for p, k in zip(pattern.split("."), parts)))


def _check_space(cfg: Config) -> None:
    """Every search range names a numeric setting a trial may change, once, with bounds (or choices)
    inside that setting's own range."""
    seen: set[str] = set()
    for i, entry in enumerate(cfg.tune.space):
        where = f"tune.space.{i} ({entry.key})"
        kind = setting_kind(cfg, entry.key)
        if kind is None or not entry.key.startswith(TUNABLE):
            raise ConfigError(f"{where}: not a numeric setting a trial may change; tune one under model., text. or "
                              "train. (or data.batch_size, data.distribution.*), e.g. train.lr.prompts")
        if entry.key in seen:
            raise ConfigError(f"{where}: tuned twice; keep one range for it")
        seen.add(entry.key)
        if entry.choices is not None:
            if entry.low is not None or entry.high is not None or entry.log or not entry.choices:
                raise ConfigError(f"{where}: give either a non-empty list of choices or low and high (and log)")
            values = entry.choices
        else:
            if entry.low is None or entry.high is None or entry.low >= entry.high:
                raise ConfigError(f"{where}: needs low < high (or a list of choices), got low={entry.low}, "
                                  f"high={entry.high}")
            if entry.log and entry.low <= 0:
                raise ConfigError(f"{where}: a log scale needs low > 0, got {entry.low}")
            values = [entry.low, entry.high]
        low, low_in, high, high_in = bounds = _range_of(entry.key)
        for value in values:
            if kind is int and not float(value).is_integer():
                raise ConfigError(f"{where}: {entry.key} is a whole number; {value} is not")
            if value < low or (value == low and not low_in) or \
                    (high is not None and (value > high or (value == high and not high_in))):
                raise ConfigError(f"{where}: {value} is outside {entry.key}'s range {range_text(*bounds)}")


def validate(cfg: Config) -> None:
    """Checks that need more than types and no model: choices, value ranges, phases and learning
    rates. What depends on the method (stages against the backbone's depth, phases that train
    something of it) is checked by the model registry, ``hclafter.models.check_config``."""
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key}: {_get(cfg, key)!r} is not one of {', '.join(allowed)}")
    for pattern, (low, low_in, high, high_in) in RANGES.items():
        for key, value in values_at(cfg, pattern):
            if value is None:
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number in {range_text(low, low_in, high, high_in)}, got "
                                  f"{value}")
            bad = value < low or (value == low and not low_in)
            bad |= high is not None and (value > high or (value == high and not high_in))
            if bad:
                raise ConfigError(f"{key} must be in {range_text(low, low_in, high, high_in)}, got {value}")
    stages = cfg.model.stages
    if not cfg.train.phases:
        raise ConfigError("train.phases must list at least one phase")
    for i, phase in enumerate(cfg.train.phases):
        unknown = sorted(set(phase.train) - set(PARAM_GROUPS))
        if unknown:
            raise ConfigError(f"train.phases[{i}].train: unknown groups {unknown}; valid: {list(PARAM_GROUPS)}")
        if phase.stages is not None and any(not 1 <= s <= len(stages) for s in phase.stages):
            raise ConfigError(f"train.phases[{i}].stages {phase.stages}: stage numbers must be in 1..{len(stages)}")
    phase_steps(cfg.train, 1)  # a step budget too small for the phases
    missing = sorted(set(PARAM_GROUPS) - set(cfg.train.lr))
    unknown_lr = sorted(set(cfg.train.lr) - set(PARAM_GROUPS))
    if missing or unknown_lr:
        raise ConfigError(f"train.lr: groups {missing} lack a learning rate" if missing else
                          f"train.lr: unknown groups {unknown_lr}; valid: {list(PARAM_GROUPS)}")
    if cfg.train.supervision == "pseudo" and cfg.train.loss.name == "dual_task":
        raise ConfigError("train.loss.name: dual_task needs label-derived distributions; with "
                          "train.supervision=pseudo use ce or ls_ce")
    if cfg.train.supervision == "pseudo" and cfg.data.train_augment != "none":
        raise ConfigError("data.train_augment applies to labelled training; pseudo-label training has its own "
                          "strong view: leave it at none")
    if cfg.backbone.random_init and cfg.backbone.pretrained is not None:
        raise ConfigError(f"backbone.random_init=true contradicts backbone.pretrained={cfg.backbone.pretrained}; "
                          "drop one of them")
    unknown_trackers = sorted(set(cfg.train.log_with) - set(TRACKERS))
    if unknown_trackers:
        raise ConfigError(f"train.log_with: unknown trackers {unknown_trackers}; valid: {list(TRACKERS)} (or [] for none)")
    _check_space(cfg)
    ratios = cfg.data.split_ratios
    if len(ratios) != 3 or abs(sum(ratios) - 1) > 1e-6 or ratios[1] <= 0:
        raise ConfigError(f"data.split_ratios must be 3 non-negative fractions summing to 1 with val > 0, got {ratios}")


def to_dict(cfg: Config) -> dict[str, Any]:
    """The settings as plain dicts and lists (what OmegaConf.to_container gives, 100 times faster)."""
    return dataclasses.asdict(cfg)
