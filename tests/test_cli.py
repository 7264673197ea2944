"""End to end through the CLI: train the tiny config, evaluate, predict."""
import json

import pytest

from hclafter.apps.cli import main

from .conftest import TINY_CONFIG


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "-c", str(TINY_CONFIG), "--out", str(out), "--quiet", f"cache_dir={cache_dir}"]) == 0
    return out


def test_train_writes_the_run_directory(tiny_run):
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


def test_eval_reproduces_the_summary(tiny_run, capsys):
    capsys.readouterr()
    assert main(["eval", str(tiny_run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics == json.loads((tiny_run / "summary.json").read_text())["test"]


def test_predict_prints_label_and_distribution(tiny_run, capsys):
    image = (tiny_run / "splits" / "test.csv").read_text().splitlines()[1].split(",")[0]
    capsys.readouterr()
    assert main(["predict", str(tiny_run), image, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["image"] == image
    assert set(result["distribution"]) == {"amusement", "contentment", "awe", "excitement", "fear", "sadness",
                                           "disgust", "anger"}
    assert sum(result["distribution"].values()) == pytest.approx(1.0, abs=1e-4)
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


def test_zeroshot_runs(capsys, cache_dir):
    assert main(["zeroshot", "-c", str(TINY_CONFIG), "--json", f"cache_dir={cache_dir}"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["num_samples"] > 0 and 0.0 <= metrics["accuracy"] <= 1.0
