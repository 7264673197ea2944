"""End to end through the CLI: train the tiny config, evaluate, predict."""
import contextlib
import io
import json

import numpy as np
import pytest

from hclafter.apps.cli import main
from hclafter.core.config import load_config
from hclafter.engine.frozen import zeroshot_eval

from .conftest import TINY_CONFIG


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """The tiny config trained through the CLI: its run directory and what the command printed."""
    out = tmp_path_factory.mktemp("run")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["train", "-c", str(TINY_CONFIG), "--out", str(out), "--quiet", f"cache_dir={cache_dir}"]) == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def tiny_run(trained):
    return trained[0]


def printed_table(metrics: dict) -> list[str]:
    """The lines a command prints for a split's metrics: name and value to 4 decimals."""
    rows = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
            "polarity_accuracy": metrics["polarity_accuracy"],
            **{f"stage{s}_accuracy": a for s, a in enumerate(metrics.get("stage_accuracy") or [], 1)},
            **{f"ldl_{k}": v for k, v in metrics["ldl"].items()}}
    return [f"{name} {value:.4f}" for name, value in rows.items()]


def test_train_writes_the_run_directory(trained):
    tiny_run, printed = trained
    for name in ("config.yaml", "run.json", "metrics.jsonl", "summary.json", "model.safetensors",
                 "last.safetensors", "predictions.csv", "splits/train.csv", "splits/val.csv", "splits/test.csv",
                 "plots/curves.png", "plots/confusion.png", "plots/stage_weights.png"):
        assert (tiny_run / name).is_file(), name
    summary = json.loads((tiny_run / "summary.json").read_text())
    test = summary["test"]
    for key in ("accuracy", "macro_f1", "polarity_accuracy", "stage_accuracy", "per_class", "confusion_matrix", "ldl"):
        assert key in test
    assert set(test["ldl"]) == {"chebyshev", "clark", "canberra", "kl", "cosine", "intersection"}
    assert len(test["stage_accuracy"]) == 3
    assert 0.0 <= test["accuracy"] <= 1.0
    assert summary["val"]["accuracy"] == max(json.loads(line)["val_accuracy"]
                                             for line in (tiny_run / "metrics.jsonl").read_text().splitlines())
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == [1, 1, 2, 2, 3, 3]
    assert records[0]["train_consistency_loss"] == 0.0 and records[-1]["train_consistency_loss"] > 0.0
    # phase 1 trains neither NGA nor the classifier, so σ stays at its initial value there
    assert records[0]["nga_weights"][0] == pytest.approx([0.0148, 0.1797, 0.8055], abs=1e-4)
    assert records[-1]["nga_weights"][0] != records[0]["nga_weights"][0]
    assert set(summary["text_only"]) == {"val", "test"}
    assert summary["parameters"]["added"] > 0
    n_test = len((tiny_run / "predictions.csv").read_text().splitlines()) - 1
    assert n_test == test["num_samples"] == summary["num_samples"]["test"]
    # it prints a line per epoch (with --quiet too), where the run went with the epoch selected on val,
    # and the test metrics of that checkpoint
    lines = [" ".join(line.split()) for line in printed.splitlines()]
    epochs, rest = lines[:len(records)], lines[len(records):]
    assert [line.split(" acc ")[0] for line in epochs] == [
        f"epoch {r['epoch']}/{len(records)} (phase {r['phase']}): train loss {r['train_loss']:.4f}" for r in records]
    assert [n for n, line in enumerate(epochs, 1) if line.endswith("(best so far)")][-1] == summary["best_epoch"]
    assert rest == [f"run written to {tiny_run} (best epoch {summary['best_epoch']} on val)", *printed_table(test)]


def test_eval_reproduces_the_summary(tiny_run, capsys):
    capsys.readouterr()
    assert main(["eval", str(tiny_run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics == json.loads((tiny_run / "summary.json").read_text())["test"]


def test_predict_prints_label_and_distribution(tiny_run, capsys):
    import hclafter

    image = (tiny_run / "splits" / "test.csv").read_text().splitlines()[1].split(",")[0]
    capsys.readouterr()
    assert main(["predict", str(tiny_run), image, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["image"] == image
    assert list(result["distribution"]) == ["amusement", "contentment", "awe", "excitement", "fear", "sadness",
                                            "disgust", "anger"]
    # the run's prediction for that image, printed to 6 decimals
    expected = hclafter.load_run(tiny_run).predict([image]).distributions[0]
    assert list(result["distribution"].values()) == pytest.approx(expected, abs=1e-6)
    assert result["label"] == max(result["distribution"], key=result["distribution"].get)


def test_load_run_api(tiny_run):
    import hclafter

    run = hclafter.load_run(tiny_run)
    image = (tiny_run / "splits" / "test.csv").read_text().splitlines()[1].split(",")[0]
    pred = run.predict([image, image])
    assert pred.labels[0] == pred.labels[1]
    assert pred.distributions.shape == (2, 8)


def test_runs_are_reproducible(tiny_run, tmp_path, cache_dir):
    assert main(["train", "-c", str(TINY_CONFIG), "--out", str(tmp_path), "--quiet", f"cache_dir={cache_dir}"]) == 0
    first = json.loads((tiny_run / "summary.json").read_text())
    second = json.loads((tmp_path / "summary.json").read_text())
    for key in ("val", "test", "test_last", "text_only", "best_epoch"):
        assert first[key] == second[key]


def test_errors_are_reported_without_traceback(tmp_path, capsys):
    assert main(["train", "-c", str(TINY_CONFIG), "--out", str(tmp_path), "model.stagez=1"]) == 2
    assert "Did you mean: 'stages'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "config.yaml is missing" in capsys.readouterr().err
    assert main(["train", "-c", str(tmp_path / "nope.yaml"), "--out", str(tmp_path)]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_zeroshot_prints_the_zero_shot_metrics(capsys, cache_dir):
    overrides = [f"cache_dir={cache_dir}"]
    assert main(["zeroshot", "-c", str(TINY_CONFIG), "--json", *overrides]) == 0
    metrics = json.loads(capsys.readouterr().out)
    # zero-shot CLIP's metrics on the test split (computed again in this process: exactly the same)
    assert metrics == zeroshot_eval(load_config([TINY_CONFIG], overrides), "test", progress=False)
    matrix = np.array(metrics["confusion_matrix"])
    assert metrics["num_samples"] == matrix.sum() > 0 and metrics["accuracy"] == np.trace(matrix) / matrix.sum()
    assert main(["zeroshot", "-c", str(TINY_CONFIG), *overrides]) == 0  # without --json: the table, last
    lines, table = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()], printed_table(metrics)
    assert lines[-len(table):] == table
