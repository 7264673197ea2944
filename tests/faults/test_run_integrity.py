"""Integrity of run directories (issue 14, points 1-3, 5, 9, 11): locked run directories, resumes
that continue on the run's own config and splits, sweeps that notice a changed sweep file, one clean
line (exit 2) for damaged files, every dropped input and absent class reported, atomic plots. The
kill tests of points 1 and 11 are in test_kill_resume.py."""
import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from hclafter.core import files
from hclafter.models.backbone import BackboneError, load_backbone
from hclafter.apps.cli import main
from hclafter.core.config import load_config, to_dict
from hclafter.engine.run import train_run

from ..conftest import ROOT, TINY_CFG, TINY_CONFIG
from .test_kill_resume import FAST

CLASSES = ("amusement", "contentment", "awe", "excitement", "fear", "sadness", "disgust", "anger")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, cache_dir):
    """An image-folder copy of the tiny synthetic images: a dataset whose root can change."""
    root = tmp_path_factory.mktemp("dataset") / "images"
    cfg = load_config([TINY_CONFIG], [f"cache_dir={cache_dir}", *FAST])
    from hclafter.data import load_splits

    data = load_splits(cfg.data, cfg.seed, cache_dir)
    for split in ("train", "val", "test"):
        for s in data[split]:
            target = root / data.wheel.classes[s.label] / os.path.basename(s.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(s.path, target)
    return root


def folder_config(cache_dir, root, *more):
    return load_config([TINY_CONFIG], [f"cache_dir={cache_dir}", *FAST, "data.format=imagefolder",
                                       f"data.root={root}", *more])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache_dir, dataset):
    out = tmp_path_factory.mktemp("finished") / "run"
    train_run(folder_config(cache_dir, dataset), out, progress=False)
    return out


def copy_of(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def summary(run):
    return json.loads((run / "summary.json").read_text())


def error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# 2. a resume continues on the run's own splits and config, or refuses naming what changed


def test_every_checkpoint_stores_the_runs_config_and_split_fingerprint(finished):
    latest = json.loads((finished / "checkpoints" / "latest.json").read_text())
    state = json.loads((finished / "checkpoints" / latest["folder"] / "state.json").read_text())
    fingerprint = state["fingerprint"]
    assert fingerprint["config"] == to_dict(load_config([finished / "config.yaml"]))
    assert sorted(fingerprint["splits"]) == ["skipped.json", "test.csv", "train.csv", "val.csv"]


def test_resume_uses_the_saved_splits_after_images_were_added(finished, dataset, tmp_path):
    copy = copy_of(finished, tmp_path)
    added = []
    try:
        for cls in CLASSES:  # new images in every class: a fresh split would move test images into train
            for source in sorted((dataset / cls).iterdir())[:3]:
                added.append(dataset / cls / f"new-{source.name}")
                shutil.copy(source, added[-1])
        assert main(["train", "--out", str(copy), "--resume", "--quiet"]) == 0
    finally:
        for path in added:
            path.unlink()
    assert summary(copy) == summary(finished)
    assert (copy / "splits" / "test.csv").read_bytes() == (finished / "splits" / "test.csv").read_bytes()


def test_resume_refuses_an_edited_config_naming_what_changed(finished, tmp_path, capsys):
    copy = copy_of(finished, tmp_path)
    cfg = OmegaConf.load(copy / "config.yaml")
    cfg.data.root = str(tmp_path)
    cfg.train.lr.fusion = 0.5
    (copy / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    before = (copy / "summary.json").read_bytes()
    assert main(["train", "--out", str(copy), "--resume", "--quiet"]) == 2
    err = error_line(capsys)
    assert "config.yaml was changed after the run's last checkpoint" in err
    assert "data.root" in err and str(tmp_path) in err and "train.lr.fusion: 0.01 → 0.5" in err
    assert (copy / "summary.json").read_bytes() == before


def test_resume_refuses_edited_split_lists(finished, tmp_path, capsys):
    copy = copy_of(finished, tmp_path)
    lines = (copy / "splits" / "test.csv").read_text().splitlines(keepends=True)
    (copy / "splits" / "test.csv").write_text("".join(lines[:-1]))  # one test image fewer: still a valid list
    assert main(["train", "--out", str(copy), "--resume", "--quiet"]) == 2
    assert "test.csv changed or went missing after the run's last checkpoint" in error_line(capsys)


def test_resume_compares_overrides_with_the_runs_own_config(finished, tmp_path, capsys):
    copy = copy_of(finished, tmp_path)
    assert main(["train", "--out", str(copy), "--resume", "--quiet", "train.lr.fusion=0.5"]) == 2
    err = error_line(capsys)
    assert "train.lr.fusion: 0.01 → 0.5" in err and "model_cfg" not in err and err.count("→") == 1
    # an override that repeats the run's own value changes nothing, so the run resumes
    assert main(["train", "--out", str(copy), "--resume", "--quiet", "seed=0"]) == 0


# 3. a sweep notices runs made with other settings than it now plans


def _sweep_file(path, root, cache_dir):
    path.write_text(yaml.safe_dump({
        "base": [str(TINY_CONFIG)], "methods": {"hybrid": []}, "seeds": [0],
        "overrides": [*FAST, f"cache_dir={cache_dir}", "data.format=imagefolder", f"data.root={root}"]}))
    return path


def test_sweep_refuses_finished_runs_of_a_changed_sweep_file_or_reruns_them(dataset, tmp_path, cache_dir, capsys):
    other = tmp_path / "other-images"
    shutil.copytree(dataset, other)
    sweep, out = _sweep_file(tmp_path / "sweep.yaml", dataset, cache_dir), tmp_path / "sweep"
    assert main(["sweep", str(sweep), "--out", str(out), "--quiet"]) == 0
    run = out / "runs" / "default" / "hybrid" / "default" / "seed0"
    first = summary(run)
    capsys.readouterr()

    _sweep_file(sweep, other, cache_dir)  # the sweep file now names another data.root
    for command in (["sweep", str(sweep), "--out", str(out), "--quiet"],
                    ["sweep", str(sweep), "--out", str(out), "--collect"]):  # the SLURM side checks alike
        assert main(command) == 2
        err = error_line(capsys)
        assert f"1 run(s) of the sweep were made with other settings than it now plans:\n  {run}: data.root: " \
               f"'{dataset}' → '{other}'" in err
        assert "--rerun-changed" in err
    assert summary(run) == first  # nothing was touched

    assert main(["sweep", str(sweep), "--out", str(out), "--quiet", "--rerun-changed"]) == 0
    assert "running again (its settings changed)" in capsys.readouterr().out
    assert load_config([run / "config.yaml"]).data.root == str(other)
    assert main(["sweep", str(sweep), "--out", str(out), "--quiet"]) == 0  # now up to date: skipped
    assert "done earlier, skipped" in capsys.readouterr().out

    holder = subprocess.Popen(  # 1. another process holds the run's lock: the sweep stops, naming it
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from hclafter.core.files import run_lock\n"
                               "with run_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(120)",
         str(run)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["sweep", str(sweep), "--out", str(out), "--quiet"]) == 2
        assert f"{run} is in use by PID {holder.pid} on " in error_line(capsys)
    finally:
        holder.kill()
        holder.wait()


# 5. a damaged run directory: one line naming the file (exit 2), never a traceback; every damage of
# every file under every command that reads it: test_corruption_matrix.py


def test_a_config_yaml_cut_anywhere_gives_one_line(finished, tmp_path, capsys):
    copy = copy_of(finished, tmp_path)
    text = (finished / "config.yaml").read_bytes()
    for tenth in range(1, 10):  # a cut lands in a key, a value, a list: every one is refused in one line
        (copy / "config.yaml").write_bytes(text[: len(text) * tenth // 10])
        for command in (["eval", str(copy)], ["train", "--out", str(copy), "--resume", "--quiet"]):
            assert main(command) == 2, tenth
            lines = error_line(capsys).strip().splitlines()
            assert len(lines) == 1 and "config.yaml" in lines[0], (tenth, lines)


def test_report_on_a_read_only_or_full_disk_names_the_file(finished, tmp_path, capsys, monkeypatch):
    copy = copy_of(finished, tmp_path)
    for number, message in ((errno.EROFS, "Read-only file system"), (errno.ENOSPC, "No space left on device")):
        def fail(*args, **kwargs):
            raise OSError(number, message)

        monkeypatch.setattr(files.os, "fsync", fail)
        assert main(["report", str(copy)]) == 2
        line = error_line(capsys)  # the first file the report writes: a figure, or the page
        assert line.startswith(f"error: {copy}/") and f": {message}; check the path" in line
        assert not list(copy.glob(".report.html.*"))


def test_predict_on_a_folder_and_an_unknown_format_are_one_line(finished, dataset, capsys):
    assert main(["predict", str(finished), str(dataset)]) == 0  # a folder is searched for images (issue 15)
    assert main(["data", "check", "--format", "nosuch", str(dataset)]) == 2
    assert "data.format: unknown format 'nosuch'; available: synthetic, imagefolder" in error_line(capsys)


def test_a_manifest_path_over_255_bytes_is_a_bad_path_not_a_crash(dataset, tmp_path, capsys):
    manifest = tmp_path / "manifest.csv"
    images = sorted(dataset.rglob("*.png"))
    rows = [f"{p},{p.parent.name}" for p in images] + [f"{'x' * 300}.png,anger"]
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    for skip in ([], ["--skip-invalid"]):
        code = main(["data", "check", "--format", "manifest", str(manifest), *skip])
        out = capsys.readouterr().out
        assert "1 bad_path" in out and "File name too long" in out
        assert code == (0 if skip else 1)


def test_weights_of_another_architecture_are_a_backbone_error(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    other = {**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "image_size": 64}}  # another position grid
    state = open_clip.CLIP(**other).state_dict()
    save_file({k: v.half().contiguous() for k, v in state.items()}, tmp_path / "other.safetensors")
    with pytest.raises(BackboneError, match=r"other\.safetensors: weights do not fit backbone\.name='tiny'"):
        load_backbone("tiny", str(tmp_path / "other.safetensors"), model_cfg=TINY_CFG)


# 9. broken links and absent classes are reported, macro-F1 covers the classes present


def test_broken_and_looping_links_named_like_images_are_reported(dataset, tmp_path, capsys):
    root = tmp_path / "images"
    shutil.copytree(dataset, root)
    (root / "awe" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (root / "fear" / "loop.png").symlink_to(root / "fear" / "loop.png")
    assert main(["data", "check", "--format", "imagefolder", str(root)]) == 1
    out = capsys.readouterr().out
    assert "2 bad input(s): 2 broken_link" in out and "gone.jpg" in out and "loop.png" in out
    assert main(["data", "check", "--format", "imagefolder", str(root), "--skip-invalid"]) == 0
    assert "ok: training can start (2 bad input(s) will be skipped)" in capsys.readouterr().out


def test_a_class_absent_from_test_is_reported_and_left_out_of_macro_f1(dataset, tmp_path, cache_dir, capsys):
    rows = []
    for cls in CLASSES:
        images = sorted((dataset / cls).iterdir())
        splits = ["val", "val"] + (["train"] * (len(images) - 2) if cls == "anger" else
                                   ["test", "test"] + ["train"] * (len(images) - 4))
        rows += [f"{p},{cls},{split}" for p, split in zip(images, splits)]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    assert main(["data", "check", "--format", "manifest", str(manifest)]) == 0
    assert "classes without images (left out of that split's macro-F1):\n  test: anger" in capsys.readouterr().out
    result = train_run(load_config([TINY_CONFIG], [f"cache_dir={cache_dir}", *FAST, "data.format=manifest",
                                                   f"data.root={manifest}"]), tmp_path / "run", progress=False)
    assert result["absent_classes"] == {"test": ["anger"]} and summary(tmp_path / "run") == result
    test = result["test"]
    assert test["macro_f1_classes"] == 7 and result["val"]["macro_f1_classes"] == 8
    present = [v["f1"] for c, v in test["per_class"].items() if c != "anger"]
    assert test["macro_f1"] == pytest.approx(float(np.mean(present)))


# 11. plots are written atomically


def test_a_kill_while_a_plot_is_written_leaves_the_previous_plot(tmp_path, monkeypatch):
    from hclafter.reporting.plots import plot_confusion

    path = tmp_path / "confusion.png"
    plot_confusion([[1, 0], [0, 1]], ["awe", "fear"], path)
    before = path.read_bytes()

    def killed(fd):
        raise KeyboardInterrupt  # the process stops while the new image is on its way to disk

    monkeypatch.setattr(files.os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        plot_confusion([[0, 1], [1, 0]], ["awe", "fear"], path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["confusion.png",
                                                                                          "confusion.svg"]
