"""Every file a run, a cache, the image store or an export writes, damaged in every way (one flipped
bit, truncated, emptied, replaced by a pickle, NaN where it holds numbers), under every command that
reads it: the outcome is one line naming the file (exit 2, or one exception for the Python API) or a
warning naming it and a rebuild that gives the clean run's predictions; never a traceback, never a
silent other result, never an unpickling (issue 24, point 6). The cases come from one table, FILES.

Runs are tiny (a 2-block tower, 24 images, one epoch) and use one CPU thread, where such a model is
many times faster than with two threads on a loaded host; two finished runs and one export serve
every case, each case damaging a copy. Figures are not drawn (they are made from the run's files
after training, and read no cache; the report's cases stop at the damaged file before any figure).
"""
from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import pickle
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch

import hclafter
from hclafter.apps import serve
from hclafter.apps.cli import main
from hclafter.core.config import ConfigError
from hclafter.core.files import RunError
from hclafter.data import DataError
from hclafter.reporting import report

from ..conftest import TINY_CONFIG

DATA = Path(__file__).parents[1] / "data"
TOWER = ("backbone.model_cfg={embed_dim: 32, vision_cfg: {image_size: 32, patch_size: 16, width: 32, layers: 2, "
         "head_width: 16, mlp_ratio: 2.0}, text_cfg: {context_length: 77, vocab_size: 49408, width: 32, heads: 2, "
         "layers: 1, mlp_ratio: 2.0}}")
TINY = [TOWER, "model.stages=[[1], [2]]", "data.synthetic.per_class=3", "data.synthetic.image_size=32",
        "data.batch_size=8", "text.steps=1", f"text.descriptions={DATA / 'descriptions_one_each.json'}",
        "text.templates=['a {} photo']", "train.log_with=[]"]
VARIANTS = {  # the image store (prompts train: the tower's output changes), and the feature cache (it cannot)
    "store": ["model.prompt_tokens=2", "train.phases=[{epochs: 1, train: [stage_adapters, fusion, prompts]}]"],
    "features": ["model.prompt_tokens=0", "train.phases=[{epochs: 1, train: [stage_adapters, fusion]}]"],
}


# --- the damages ---------------------------------------------------------------------------------


class _Unpickled:
    """A pickle that, if anything ever unpickled it, would create the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def flip(path: Path, ctx: "Case") -> None:
    """One bit of the middle byte: a text file stays text, a number changes by a digit or a last bit."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path, ctx: "Case") -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty(path: Path, ctx: "Case") -> None:
    path.write_bytes(b"")


def pickled(path: Path, ctx: "Case") -> None:
    path.write_bytes(pickle.dumps({"weights": _Unpickled(ctx.marker), "data": [1.0, 2.0]}))


def nan(path: Path, ctx: "Case") -> None:
    """NaN in place of the first number: a float32 of a tensor, a value of a text file."""
    data = bytearray(path.read_bytes())
    if path.suffix == ".safetensors":
        size = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + size])
        start = next(v["data_offsets"][0] for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
        data[8 + size + start:8 + size + start + 4] = struct.pack("<f", float("nan"))
        path.write_bytes(bytes(data))
    elif path.suffix == ".npy":
        records = np.load(path, mmap_mode="r+")
        records["features"][0, 0, 0] = np.nan
        records.flush()
    else:
        word = {".yaml": ".nan", ".csv": "nan"}.get(path.suffix, "NaN")
        text, count = re.subn(r"(?<=[\s:,\[])-?\d+\.\d+(?:[eE][-+]?\d+)?(?=[\s,\]}])", word, path.read_text(), count=1)
        assert count == 1, f"{path} holds no number"
        path.write_text(text)


DAMAGES = {"flip": flip, "truncate": truncate, "empty": empty, "pickle": pickled, "nan": nan}


# --- the commands ----------------------------------------------------------------------------------


@dataclass
class Case:
    """What a command works on: the copy of a finished run, its cache, an export, a scratch folder."""

    run: Path
    cache: Path
    export: Optional[Path]
    tmp: Path
    variant: str

    @property
    def marker(self) -> Path:
        return self.tmp / "unpickled"


def _cli(*args: str) -> Callable[[Case], list[str]]:
    return lambda c: [a.format(run=c.run, cache=c.cache, tmp=c.tmp, image=_image(c.cache)) for a in args]


def _image(cache: Path) -> Path:
    return next((cache / "synthetic").glob("*/images/awe/0000.png"))


COMMANDS: dict[str, Callable[[Case], list[str]]] = {
    "train": lambda c: ["train", "-c", str(TINY_CONFIG), "--out", str(c.tmp / "new"), "--quiet",
                        f"cache_dir={c.cache}", *TINY, *VARIANTS[c.variant]],
    "train --resume": _cli("train", "--out", "{run}", "--resume", "--quiet"),
    "eval": _cli("eval", "{run}"),
    "predict": _cli("predict", "{run}", "{image}"),
    "report": _cli("report", "{run}"),
    "export": _cli("export", "{run}", "--format", "hf", "{tmp}/hf"),
    "serve": _cli("serve", "{run}"),  # up to the page: the UI is stubbed out below
    "API": lambda c: [],  # hclafter.load_run / hclafter.from_pretrained
}
RUN_READERS = ("eval", "predict", "report", "export", "serve", "API")  # a finished run's files
LOADERS = ("eval", "predict", "export", "serve", "API")  # what rebuilds the run's model


# --- the table: every file, and what each command that reads it does with a damaged one -------------


@dataclass(frozen=True)
class File:
    where: str  # "run", "cache" or "export"
    pattern: str  # glob below it
    numeric: bool  # holds numbers (a NaN can be written)
    readers: dict[str, str]  # command → "error" (one line naming the file) or "rebuild" (warned, same result)
    variant: str = "store"
    covers: str = ""  # the files this one stands for (default: its pattern)


def _each(commands: tuple[str, ...], outcome: str) -> dict[str, str]:
    return dict.fromkeys(commands, outcome)


FILES = {
    # a finished run (core/checkpoint.py, engine/runfiles.py, data/splits.py)
    "config.yaml": File("run", "config.yaml", True, _each((*RUN_READERS, "train --resume"), "error")),
    "run.json": File("run", "run.json", True, _each(RUN_READERS, "error")),
    "summary.json": File("run", "summary.json", True, _each(("eval", "report", "export"), "error")),
    "metrics.jsonl": File("run", "metrics.jsonl", True, _each(("report",), "error")),
    "predictions.csv": File("run", "predictions.csv", True, _each(("report",), "error")),
    "checksums.json": File("run", "checksums.json", False, _each(RUN_READERS, "error")),
    "model.safetensors": File("run", "model.safetensors", True, _each((*LOADERS, "train --resume"), "error")),
    "text_classifier.safetensors": File("run", "text_classifier.safetensors", True,
                                        _each((*LOADERS, "train --resume"), "error")),
    "splits/test.csv": File("run", "splits/test.csv", True, _each((*RUN_READERS, "train --resume"), "error"),
                            covers="splits/*.csv"),
    "splits/skipped.json": File("run", "splits/skipped.json", False,
                                _each((*RUN_READERS, "train --resume"), "error")),
    "checkpoints/latest.json": File("run", "checkpoints/latest.json", False, _each(("train --resume",), "error")),
    "checkpoints/stage1.json": File("run", "checkpoints/stage1.json", True, _each(("train --resume",), "error")),
    "state.json": File("run", "checkpoints/step-*/state.json", True, _each(("train --resume",), "error")),
    "weights.safetensors": File("run", "checkpoints/step-*/weights.safetensors", True,
                                _each(("train --resume",), "error")),
    "optimizer.safetensors": File("run", "checkpoints/step-*/optimizer.safetensors", True,
                                  _each(("train --resume",), "error")),
    # the caches (engine/inputs.py, data/store.py, models/text.py, data/synthetic.py)
    "feature cache": File("cache", "features/*.npy", True, _each(("train", "train --resume"), "rebuild"),
                          "features"),
    "image store": File("cache", "images/*.npy", False, _each(("train", "train --resume"), "rebuild")),
    "text cache": File("cache", "text/*.safetensors", True, _each(("train",), "rebuild")),
    "stage-1 cache": File("cache", "stage1/*.safetensors", True, _each(("train",), "rebuild")),
    "text-only metrics": File("cache", "text_only/*.json", True, _each(("train",), "rebuild")),
    "synthetic manifest": File("cache", "synthetic/*/manifest.csv", True,
                               _each(("train", "train --resume", "eval"), "rebuild")),
    "synthetic stamp": File("cache", "synthetic/*/synthetic.json", False,
                            _each(("train", "train --resume", "eval"), "rebuild")),
    "synthetic image": File("cache", "synthetic/*/images/fear/0001.png", False,
                            _each(("train", "train --resume", "eval"), "rebuild"), covers="synthetic/*/images/*/*.png"),
    # an export (apps/export.py); README.md is read by no command, nor is an ONNX graph (written
    # atomically after its checks: tests/test_export.py), and a run's plots are drawn anew by report
    "export config.json": File("export", "config.json", True, _each(("API",), "error")),
    "export model.safetensors": File("export", "model.safetensors", True, _each(("API",), "error")),
}

CASES = [pytest.param(name, damage, command, outcome, id=f"{name}-{damage}-{command}")
         for name, f in FILES.items() for damage in DAMAGES if damage != "nan" or f.numeric
         for command, outcome in f.readers.items()]


# --- the finished runs every case copies ----------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two finished runs (one per variant) sharing a cache, a pristine copy of that cache, an export,
    and what the clean commands print; single-threaded, figures not drawn."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "write_run_figures", lambda run_dir, summary=None: {})
        patch.setattr(serve, "_gradio", lambda: None)
        patch.setattr(serve, "build_app", lambda run, max_pixels: type("App", (), {"launch": lambda *a, **k: None})())
        root = tmp_path_factory.mktemp("matrix")
        cache = root / "cache"
        runs = {}
        for variant, overrides in VARIANTS.items():
            runs[variant] = root / variant
            assert main(["train", "-c", str(TINY_CONFIG), "--out", str(runs[variant]), "--quiet",
                         f"cache_dir={cache}", *TINY, *overrides]) == 0
        assert main(["export", str(runs["store"]), "--format", "hf", str(root / "hf")]) == 0
        shutil.copytree(cache, root / "pristine")
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            assert main(["eval", str(runs["store"])]) == 0
        metrics = [line for line in printed.getvalue().splitlines() if " split, " not in line]
        assert len(metrics) > 5
        yield {"root": root, "cache": cache, "runs": runs, "export": root / "hf", "eval": metrics}
    torch.set_num_threads(threads)


def _restore_cache(world: dict) -> None:
    shutil.rmtree(world["cache"])
    shutil.copytree(world["root"] / "pristine", world["cache"])


def _run(command: str, case: Case, capsys) -> tuple[int, list[str], str]:
    """Exit status, stderr lines and stdout of a command (the Python API as the CLI reports it)."""
    if command != "API":
        code = main(COMMANDS[command](case))
        out = capsys.readouterr()
        return code, out.err.splitlines(), out.out
    try:
        hclafter.load_run(case.run) if case.export is None else hclafter.from_pretrained(case.export)
    except (RunError, ConfigError, DataError) as e:
        return 2, [f"error: {e}"], ""
    return 0, [], ""


@pytest.mark.parametrize("name, damage, command, outcome", CASES)
def test_a_damaged_file_is_named_or_rebuilt(name, damage, command, outcome, world, tmp_path, capsys):
    f = FILES[name]
    if f.where == "cache":
        _restore_cache(world)
    run = tmp_path / "run"
    shutil.copytree(world["runs"][f.variant], run, ignore=shutil.ignore_patterns("plots", "logs"))
    case = Case(run, world["cache"], None, tmp_path, f.variant)
    if f.where == "export":
        case.export = tmp_path / "hf"
        shutil.copytree(world["export"], case.export)
    base = {"run": run, "cache": world["cache"], "export": case.export}[f.where]
    target = sorted(base.glob(f.pattern))[0]  # the first of files alike (the text-only metrics of val and test)
    DAMAGES[damage](target, case)

    code, err, out = _run(command, case, capsys)
    assert not any("Traceback" in line for line in err)
    assert not case.marker.exists(), "a pickle was unpickled"
    if outcome == "error":
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and target.name in err[0], err
        return
    assert code == 0, err
    warned = [line for line in err if line.startswith("warning: ") and target.name in line]
    assert warned and "rebuilding it" in warned[0], err
    if command == "eval":  # the same metrics as on the clean cache (the header names the run)
        assert [line for line in out.splitlines() if " split, " not in line] == world["eval"]
    else:
        made = tmp_path / "new" if command == "train" else run
        reference = world["runs"][f.variant]
        for predictions in ("predictions.csv", "predictions_val.csv"):
            assert (made / predictions).read_bytes() == (reference / predictions).read_bytes()


def test_the_table_names_every_file_a_run_its_cache_and_an_export_hold(world):
    """A file added to what a run, a cache or an export writes must be added to FILES."""
    unread = {"last.safetensors", "predictions_val.csv", "README.md"}  # no command of the list reads them back
    places = {"run": world["runs"]["store"], "cache": world["cache"], "export": world["export"]}
    for where, base in places.items():
        patterns = [f.covers or f.pattern for f in FILES.values() if f.where == where]
        for path in base.rglob("*"):
            name = str(path.relative_to(base))
            if path.is_file() and not re.match(r"(plots|logs)/|\.hclafter\.lock", name) and path.name not in unread:
                assert any(fnmatch.fnmatch(name, p) for p in patterns), f"{where}: {name} is not in FILES"


def _flip_bytes(path: Path, count: int, seed: int) -> None:
    """Flip ``count`` bytes at random places of an .npy file's data (a damaged header would make the
    whole file unusable, which a check of the layout alone finds)."""
    with open(path, "rb") as f:
        np.lib.format.read_array_header_1_0(f) if np.lib.format.read_magic(f) == (1, 0) else \
            np.lib.format.read_array_header_2_0(f)
        start = f.tell()
    data = bytearray(path.read_bytes())
    for offset in start + np.random.default_rng(seed).choice(len(data) - start, count, replace=False):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("variant, pattern", [("features", "features/*.npy"), ("store", "images/*.npy")])
def test_three_hundred_flipped_bytes_are_warned_and_rebuilt_to_the_clean_predictions(variant, pattern, world,
                                                                                    tmp_path, capsys):
    _restore_cache(world)
    (target,) = world["cache"].glob(pattern)
    _flip_bytes(target, 300, seed=1)
    case = Case(tmp_path / "run", world["cache"], None, tmp_path, variant)
    assert main(COMMANDS["train"](case)) == 0
    assert f"warning: {target}: " in capsys.readouterr().err
    reference = world["runs"][variant]
    assert (tmp_path / "new" / "predictions.csv").read_bytes() == (reference / "predictions.csv").read_bytes()
