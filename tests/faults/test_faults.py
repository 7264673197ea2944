"""Corrupt files, full disks, NaN batches and malformed configs: clear messages, nothing earlier lost."""
import errno
import json

import pytest
import torch

import hclafter
from hclafter.core import checkpoint
from hclafter.engine import run
from hclafter.apps.cli import main
from hclafter.core.config import ConfigError, load_config
from hclafter.data import EmotionImages
from hclafter.engine.run import RunError, train_run
from hclafter.models import check_config

from ..conftest import TINY_CONFIG
from .test_kill_resume import FAST


def config(cache_dir, *more):
    return load_config([TINY_CONFIG], [f"cache_dir={cache_dir}", *FAST, *more])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("finished")
    train_run(config(cache_dir), out, progress=False)
    return out


def flip_byte(path, offset_from_end=10):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_checkpoint_is_refused_with_a_clear_message(finished, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    flip_byte(copy / "model.safetensors")
    with pytest.raises(RunError, match=r"run/model\.safetensors: content differs from the sha256 that .*checksums\.json recorded"):
        hclafter.load_run(copy)
    # nothing else was harmed: the last-epoch weights still verify
    state = checkpoint.load_checkpoint(copy / "last.safetensors")
    assert "classifier.linear.weight" in state
    (copy / "model.safetensors").write_bytes(b"")
    with pytest.raises(RunError, match=r"run/model\.safetensors: content differs from the sha256"):
        hclafter.load_run(copy)


def test_a_checkpoint_of_another_backbone_is_refused(finished, tmp_path):
    other = dict(json.loads((finished / "run.json").read_text())["backbone"], weights="random-init(seed=7)")
    with pytest.raises(checkpoint.CheckpointError, match="trained with backbone weights random-init\\(seed=0\\)"):
        checkpoint.load_checkpoint(finished / "model.safetensors", other)


def test_a_corrupt_saved_state_stops_resume_without_touching_the_run(finished, tmp_path, cache_dir):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    latest = json.loads((copy / "checkpoints" / "latest.json").read_text())
    flip_byte(copy / "checkpoints" / latest["folder"] / "optimizer.safetensors")
    before = (copy / "summary.json").read_bytes()
    with pytest.raises(RunError, match=r"cannot resume, the saved state is unreadable.*optimizer\.safetensors: content differs from the sha256 that .*latest\.json recorded"):
        train_run(config(cache_dir), copy, progress=False, resume=True)
    assert (copy / "summary.json").read_bytes() == before


def test_a_truncated_metrics_log_is_repaired_on_resume(finished, tmp_path, cache_dir):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    log = copy / "metrics.jsonl"
    full = log.read_text()
    log.write_text(full[: len(full) - 25])  # a torn last line
    train_run(config(cache_dir), copy, progress=False, resume=True)
    strip = lambda text: [{k: v for k, v in json.loads(x).items() if k != "time_s"} for x in text.splitlines()]
    assert strip(log.read_text()) == strip(full)
    assert json.loads((copy / "summary.json").read_text()) == json.loads((finished / "summary.json").read_text())


def test_a_full_disk_stops_with_a_message_and_keeps_the_previous_state(finished, tmp_path, cache_dir, monkeypatch):
    original = checkpoint.atomic_write_bytes
    calls = {"n": 0}

    def failing(path, data):
        calls["n"] += 1
        if calls["n"] == 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", failing)
    out = tmp_path / "run"
    with pytest.raises(RunError, match="No space left on device. Files written earlier are intact"):
        train_run(config(cache_dir), out, progress=False)
    monkeypatch.setattr(checkpoint, "atomic_write_bytes", original)
    train_run(config(cache_dir), out, progress=False, resume=True)
    assert json.loads((out / "summary.json").read_text()) == json.loads((finished / "summary.json").read_text())


def _nan_for(index):
    original = EmotionImages.__getitem__

    def getitem(self, i):
        item = original(self, i)
        if len(self) > 40 and i == index:  # the training split only
            item["image"] = torch.full_like(item["image"], float("nan"))
        return item

    return getitem


def test_a_nan_batch_stops_naming_its_images_and_keeps_the_last_good_state(finished, tmp_path, cache_dir,
                                                                         monkeypatch):
    monkeypatch.setattr(EmotionImages, "__getitem__", _nan_for(5))  # decoded images: the file path, not the store
    out = tmp_path / "run"
    with pytest.raises(RunError, match=r"non-finite loss.*\.png.*Stopped; the last good state") as info:
        train_run(config(cache_dir, "data.image_store=false"), out, progress=False)
    assert "images/" in str(info.value)
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert all(torch.isfinite(t).all() for t in checkpoint.load_checkpoint(
        out / "checkpoints" / latest["folder"] / "weights.safetensors").values())
    monkeypatch.undo()
    train_run(config(cache_dir, "data.image_store=false"), out, progress=False, resume=True)
    assert json.loads((out / "summary.json").read_text()) == json.loads((finished / "summary.json").read_text())


def test_nan_batches_can_be_skipped_and_counted(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(EmotionImages, "__getitem__", _nan_for(5))
    summary = train_run(config(cache_dir, "train.on_nonfinite=skip", "data.image_store=false"), tmp_path / "run",
                        progress=False)
    assert len(summary["nonfinite_batches_skipped"]) == 3  # the same image, once per epoch
    assert "non-finite loss" in summary["nonfinite_batches_skipped"][0]


BAD_CONFIGS = [
    ("model.stagez=[[12]]", "Did you mean: 'stages'"),
    ("train.loss.lamda=0.5", "Did you mean: 'lam'"),
    ("model.prompt_tokens=many", "model.prompt_tokens"),
    ("model.stages=[[5, 13]]", r"model.stages\[0\] = \[5, 13\]: layers must be distinct numbers in 1\.\.12"),
    ("model.stages=[[]]", "non-empty layer lists"),
    ("model.stages=[[4, 4]]", "distinct"),
    ("train.loss.lam=1.5", r"train.loss.lam must be in \[0, 1\], got 1.5"),
    ("train.loss.temperature=0", r"train.loss.temperature must be in \(0, ∞\)"),
    ("train.phases=[]", "at least one phase"),
    ("train.phases=[{epochs: 0, train: [fusion]}]", r"train\.phases\.0\.epochs must be in \[1, 100000\], got 0"),
    ("train.phases=[{epochs: 1, train: [adapters]}]", r"unknown groups \['adapters'\]"),
    ("train.phases=[{epochs: 1, train: [fusion], stages: [4]}]", r"stage numbers must be in 1\.\.3"),
    ("train.lr.nga=-1", r"train\.lr\.nga must be in \(0, ∞\), got -1"),
    ("train.lr.adapterz=0.1", r"train.lr: unknown groups \['adapterz'\]"),
    ("data.batch_size=0", r"data.batch_size must be in \[1, ∞\)"),
    ("data.split_ratios=[0.9, 0.0, 0.1]", "val > 0"),
    ("data.distribution.sigma=0", r"data.distribution.sigma must be in \(0, ∞\)"),
    ("model.method=segmented", "consecutive groups of blocks covering 1..12"),
    ("model.method=cascade", "model.method: 'cascade' is not one of"),
    ("precision=fp8", "precision: 'fp8' is not one of fp32, bf16, fp16"),
    ("train.on_nonfinite=ignore", "train.on_nonfinite"),
    ("text.label_smoothing=1.0", r"text.label_smoothing must be in \[0, 1\)"),
    ("model.decoder_heads=0", r"model.decoder_heads must be in \[1, 256\], got 0"),
]


@pytest.mark.parametrize("override, message", BAD_CONFIGS)
def test_malformed_configs_are_rejected_before_any_work(override, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run, "backbone_from_config", lambda *a: pytest.fail("model built for a bad config"))
    monkeypatch.setattr(run, "load_splits", lambda *a: pytest.fail("data read for a bad config"))
    with pytest.raises(ConfigError, match=message):  # settings alone, or against the method and the backbone
        check_config(load_config([TINY_CONFIG], [override]))
    out = tmp_path / "run"
    assert main(["train", "-c", str(TINY_CONFIG), "--out", str(out), override]) == 2
    assert "error:" in capsys.readouterr().err and not out.exists()


def test_an_unknown_architecture_is_rejected_before_any_work():
    with pytest.raises(ConfigError, match="backbone.name: unknown open_clip architecture 'NoSuchNet'"):
        check_config(load_config([], ["backbone.name=NoSuchNet"]))


def test_a_malformed_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  stages: [[5, 6\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        load_config([bad])
