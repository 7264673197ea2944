"""What a researcher reads of a run: the log written to a file, the TensorBoard events, the
predictions files (every metric recomputable from them) and the HTML report with its figures."""
import csv
import json
import re
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest

from hclafter.apps.cli import main
from hclafter.core.metrics import ldl_metrics

from .conftest import ROOT, TINY_CONFIG

CLASSES = ["amusement", "contentment", "awe", "excitement", "fear", "sadness", "disgust", "anger"]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, cache_dir):
    """The tiny config (6 epochs, 3 phases) trained by the CLI with stdout and stderr going to a file."""
    out = tmp_path_factory.mktemp("logged") / "run"
    log = out.parent / "log.txt"
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "hclafter", "train", "-c", str(TINY_CONFIG), "--out", str(out),
                               f"cache_dir={cache_dir}"], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, timeout=600)
    assert done.returncode == 0, log.read_text()[-3000:]
    return out, log.read_text()


def test_a_log_written_to_a_file_has_no_bars_and_one_line_per_epoch(logged_run):
    out, log = logged_run
    assert "\r" not in log
    epochs = [line for line in log.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == [f"epoch {e}/6 (phase {(e + 1) // 2})" for e in range(1, 7)]
    assert all("val loss" in line and "val" in line for line in epochs)
    assert "text-only test: 32 images in" in log and "eval test: 32 images in" in log
    assert max(map(len, log.splitlines())) < 200


def test_quiet_keeps_the_epoch_summaries(tmp_path, cache_dir, capsys):
    assert main(["train", "-c", str(TINY_CONFIG), "--out", str(tmp_path / "run"), "--quiet", f"cache_dir={cache_dir}",
                 "train.phases=[{epochs: 2, train: [fusion]}]", "train.log_with=[]", "text.steps=20"]) == 0
    out = capsys.readouterr().out
    assert [line[:9] for line in out.splitlines() if line.startswith("epoch ")] == ["epoch 1/2", "epoch 2/2"]
    assert "images in" not in out  # no evaluation lines
    assert not (tmp_path / "run" / "logs").exists()  # train.log_with=[]: no tracker


def test_the_epoch_record_has_the_validation_loss(logged_run):
    records = [json.loads(x) for x in (logged_run[0] / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_loss"] > 0 for r in records)


def test_tensorboard_events_read_back(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = logged_run[0]
    events = EventAccumulator(str(out / "logs" / "hclafter"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = events.Tags()
    steps = int(json.loads((out / "checkpoints" / "latest.json").read_text())["folder"].split("-")[1])
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, steps + 1))  # one point per step
    for tag in ("train/task_loss", "train/consistency_loss", "lr/prompts", "lr/fusion", "lr/nga", "val/loss",
                "val/accuracy", "val/macro_f1", "val/stage1_accuracy", "train_epoch/accuracy", "nga/stage1_weight3",
                "nga/nga.0.sigma", "fusion/stage3"):
        assert tag in tags["scalars"], tag
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("val/accuracy")] == pytest.approx([r["val_accuracy"] for r in records])
    assert [e.value for e in events.Scalars("fusion/stage1")] == pytest.approx(
        [r["fusion_weights"][0] for r in records])
    assert {"figures/confusion", "figures/curves", "figures/stage_weights"} <= set(tags["images"])


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_every_metric_can_be_recomputed_from_the_predictions_file(logged_run):
    out = logged_run[0]
    summary = json.loads((out / "summary.json").read_text())["test"]
    rows = read_csv(out / "predictions.csv")
    assert list(rows[0])[:3] == ["path", "label", "prediction"]
    probs = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    targets = np.array([[float(r[f"t_{c}"]) for c in CLASSES] for r in rows])
    logits = np.array([[float(r[f"z_{c}"]) for c in CLASSES] for r in rows])
    labels = np.array([CLASSES.index(r["label"]) for r in rows])
    assert (probs.argmax(1) == labels).mean() == pytest.approx(summary["accuracy"])
    for k in range(1, 4):
        stage = np.array([[float(r[f"s{k}_{c}"]) for c in CLASSES] for r in rows])
        assert (stage.argmax(1) == labels).mean() == pytest.approx(summary["stage_accuracy"][k - 1])
    assert ldl_metrics(probs, targets)["kl"] == pytest.approx(summary["ldl"]["kl"], abs=1e-4)
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    assert softmax / softmax.sum(1, keepdims=True) == pytest.approx(probs, abs=1e-6)  # logits unrounded
    val = read_csv(out / "predictions_val.csv")
    assert list(val[0]) == list(rows[0]) and len(val) == 16


def test_the_run_report_has_every_section_and_figure(logged_run, capsys):
    out = logged_run[0]
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    for section in ("Overview", "Learning curves", "Confusion matrix", "Per class and per stage",
                    "Emotion distributions", "Examples", "NGA and fusion weights", "Data", "Cost", "Configuration"):
        assert f"<h2>{section}</h2>" in page, section
    assert "stage 1 (blocks 5–7)" in page and "stage 0" not in page
    assert "`tiny-vit`" not in page and "<code>tiny-vit</code>" in page and '"architecture"' not in page
    assert "hardware: cpu" in page and "run time" in page
    assert re.search(r"<td class=l>amusement</td><td>24</td><td>2</td><td>4</td>", page)  # per-split counts
    assert "model:" in page  # the resolved config
    trained = json.loads((out / "summary.json").read_text())["parameters"]["trained"]
    assert trained > 0 and re.search(rf"<th>trained parameters</th>.*?<tbody><tr><td>{trained:,}</td>", page)
    figures = ("curves", "confusion", "stage_weights", "stage_class_accuracy", "wheel", "examples")
    assert page.count("data:image/svg+xml;base64,") == len(figures)
    for name in figures:
        png, svg = out / "plots" / f"{name}.png", out / "plots" / f"{name}.svg"
        assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), name
        assert ElementTree.parse(svg).getroot().tag == "{http://www.w3.org/2000/svg}svg", name
        width = int.from_bytes(png.read_bytes()[16:20], "big")
        assert width <= 1200, f"{name} is {width} px wide"  # 10 inches: legible at the report's width


def test_eval_names_the_split_and_its_size(logged_run, capsys):
    assert main(["eval", str(logged_run[0]), "--split", "val"]) == 0
    assert f"{logged_run[0]}: val split, 16 images, checkpoint of epoch" in capsys.readouterr().out


def test_commands_on_a_folder_of_runs_name_the_runs(logged_run, capsys):
    parent = logged_run[0].parent
    for command in (["eval", str(parent)], ["predict", str(parent), "x.png"], ["report", str(parent)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "is not a finished run" in err and f"pass one of them: {logged_run[0]}" in err, command


def test_a_finished_run_is_not_overwritten_and_resume_is_not_advised(logged_run, capsys):
    assert main(["train", "-c", str(TINY_CONFIG), "--out", str(logged_run[0])]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run; choose another --out" in err and "--resume" not in err


@pytest.mark.parametrize("every", ["1e9", "0"])
def test_the_state_is_saved_at_phase_ends_and_improvements_or_on_the_clock(every, tmp_path, cache_dir, monkeypatch):
    """A save costs about what a validation does: with ``train.state_every_s`` not yet elapsed, a round's end
    saves only where a phase ends or validation improves (the best weights are written then); with 0, always."""
    from hclafter.engine.loop import TrainState

    saved, original = [], TrainState.save
    monkeypatch.setattr(TrainState, "save", lambda self: saved.append(self.progress.global_step) or original(self))
    out = tmp_path / "run"
    assert main(["train", "-c", str(TINY_CONFIG), "--out", str(out), "--quiet", f"cache_dir={cache_dir}",
                 "text.steps=100", f"train.state_every_s={every}", "train.log_with=[]", "train.lr.fusion=1e-12",
                 "train.phases=[{epochs: 3, train: [fusion]}, {epochs: 1, train: [fusion]}]"]) == 0  # flat
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    best, due = 0.0, []
    for i, r in enumerate(records):
        phase_ends = i == len(records) - 1 or records[i + 1]["phase"] != r["phase"]
        if r["val_accuracy"] > best or phase_ends or every == "0":
            due.append(r["step"])
        best = max(best, r["val_accuracy"])
    assert saved == [0, *due] and len(records) == 4  # 0: the state before the first step
    assert every == "0" or len(due) < len(records)  # the run must have a round that saves nothing
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())["folder"]
    assert latest == f"step-{records[-1]['step']:08d}"
