"""Every file of a run directory read back as it was written, by its one owner (engine/runfiles.py;
the split lists by data/splits.py, sweep.json by apps/sweep.py); the statistics on runs read
from their files."""
import numpy as np
import pytest

from hclafter.apps.sweep import Sweep, SweepRun, read_sweep_file, write_sweep_file
from hclafter.core import stats
from hclafter.core.config import load_config
from hclafter.core.emotions import MIKELS8, Wheel
from hclafter.data import DatasetSplits, Sample, load_split_files
from hclafter.data.splits import save_run_splits
from hclafter.engine import runfiles
from hclafter.engine.evaluation import Predictions, softmax

from .conftest import TINY_CONFIG

WHEEL = Wheel("two", ("fear", "awe"), (0, 1))


def predictions(n: int = 5, stages: int = 2, seed: int = 0) -> Predictions:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 2)).astype(np.float32)
    return Predictions(logits, rng.normal(size=(stages, n, 2)).astype(np.float32), rng.integers(0, 2, n),
                       softmax(rng.normal(size=(n, 2))), rng.permutation(n))


def test_predictions_round_trip(tmp_path):
    preds = predictions()
    samples = [Sample(f"/data/img{i}.png", int(label)) for i, label in enumerate(preds.labels)]
    runfiles.write_predictions(tmp_path, "val", preds, samples, WHEEL)
    back = runfiles.read_predictions(tmp_path, "val")
    assert back.classes == WHEEL.classes and back.paths == tuple(samples[i].path for i in preds.indices)
    assert back.labels.tolist() == preds.labels.tolist()
    assert back.predictions.tolist() == preds.logits.argmax(1).tolist()
    np.testing.assert_allclose(back.probabilities, preds.probabilities, atol=5e-7)  # written to 6 decimals
    np.testing.assert_allclose(back.targets, preds.distributions, atol=5e-7)
    np.testing.assert_allclose(back.stages, preds.stage_probabilities, atol=5e-7)
    np.testing.assert_array_equal(back.logits.astype(np.float32), preds.logits)  # 9 digits hold a float32 exactly
    reordered = runfiles.read_predictions(tmp_path, "val", ["awe", "fear"])
    np.testing.assert_array_equal(reordered.probabilities, back.probabilities[:, ::-1])
    assert reordered.labels.tolist() == (1 - back.labels).tolist()


def test_predictions_of_a_model_without_stages(tmp_path):
    preds = predictions()
    preds.stage_logits = None
    runfiles.write_predictions(tmp_path, "test", preds, [Sample(f"{i}.png", 0) for i in range(5)], WHEEL)
    assert runfiles.read_predictions(tmp_path).stages is None


def test_damaged_predictions_files_are_named(tmp_path):
    f = tmp_path / "predictions.csv"
    with pytest.raises(runfiles.PredictionsFileError, match="predictions.csv is missing"):
        runfiles.read_predictions(tmp_path)
    f.write_text("path,label,prediction,p_fear,p_awe\na.png,awe,awe,0.3,0.7\n", encoding="utf-8")
    with pytest.raises(runfiles.PredictionsFileError, match="holds classes"):
        runfiles.read_predictions(tmp_path, "test", ["awe", "joy"])
    f.write_text("path,label,prediction,p_fear,p_awe\na.png,joy,awe,0.3,0.7\n", encoding="utf-8")
    with pytest.raises(runfiles.PredictionsFileError, match=r"predictions.csv:2: unknown class 'joy'"):
        runfiles.read_predictions(tmp_path)
    f.write_text("path,label,prediction,p_fear,p_awe\na.png,awe,awe,0.3\n", encoding="utf-8")
    with pytest.raises(runfiles.PredictionsFileError, match=r"predictions.csv:2: 4 fields, the header has 5"):
        runfiles.read_predictions(tmp_path)
    f.write_text("path,label,p_fear\n", encoding="utf-8")
    with pytest.raises(runfiles.PredictionsFileError, match="header"):
        runfiles.read_predictions(tmp_path)


def test_summary_info_records_and_config_round_trip(tmp_path):
    summary = {"test": {"accuracy": 0.5}, "parameters": {"trained": 3, "added": 2, "by_group": {"fusion": 3}}}
    runfiles.write_summary(tmp_path, summary)
    assert runfiles.is_finished(tmp_path) and runfiles.read_summary(tmp_path) == summary
    cfg = load_config([TINY_CONFIG])
    runfiles.write_config(tmp_path, cfg)
    assert runfiles.read_config(tmp_path) == cfg
    (tmp_path / "splits").mkdir()
    runfiles.write_info(tmp_path, cfg, MIKELS8, {"architecture": "tiny"}, started=0.0, stages=[[1, 2]])
    info = runfiles.read_info(tmp_path)
    assert runfiles.info_wheel(info) == MIKELS8 and info["stages"] == [[1, 2]] and info["mode"] == "train"
    assert runfiles.saved_run_config(tmp_path) == info["config"]
    assert runfiles.read_records(tmp_path) == []
    runfiles.append_record(tmp_path, {"epoch": 1, "val_accuracy": 0.25})
    runfiles.append_record(tmp_path, {"epoch": 2, "val_accuracy": 0.5})
    assert [r["epoch"] for r in runfiles.read_records(tmp_path)] == [1, 2]
    runfiles.write_records(tmp_path, [{"epoch": 1}])
    assert runfiles.read_records(tmp_path) == [{"epoch": 1}]


def test_a_custom_wheel_round_trips_through_run_json():
    wheel = Wheel("three", ("a", "b", "c"), (1, 0, 0), ((0, 1, 2), (1, 0, 1), (2, 1, 0)))
    assert Wheel.from_dict(wheel.to_dict()) == wheel


def test_split_lists_round_trip(tmp_path):
    images = [tmp_path / f"{i}.png" for i in range(3)]
    splits = {"train": [Sample(str(images[0]), 0)], "val": [Sample(str(images[1]), 2, (0.125,) * 8)],
              "test": [Sample(str(images[2]), 7)]}
    save_run_splits(tmp_path / "splits", DatasetSplits(MIKELS8, splits))
    back = load_split_files(tmp_path / "splits", MIKELS8)
    assert {s: back[s] for s in ("train", "val", "test")} == splits


def test_sweep_file_round_trip(tmp_path):
    runs = [SweepRun("fi", "hybrid", "HybridCascade-LaFTer", "train.loss.lam=0.5", 1, [tmp_path / "a.yaml"],
                     ["seed=1"], tmp_path / "runs" / "x")]
    sweep = Sweep(runs, headline="hybrid", reference="lafter", pairs=[["hybrid", "lafter"]])
    write_sweep_file(tmp_path, sweep)
    assert read_sweep_file(tmp_path) == sweep
    (tmp_path / "sweep.json").write_text("[]")
    with pytest.raises(Exception, match="not a sweep file of this version"):
        read_sweep_file(tmp_path)


def test_runs_compared_from_their_files_align_images_by_path(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 30)
    samples = [Sample(f"img{i}.png", int(label)) for i, label in enumerate(labels)]
    read: dict[str, list] = {"head": [], "other": []}
    arrays: dict[str, list] = {"head": [], "other": []}
    for seed in range(3):
        for method, skill in (("head", 0.8), ("other", 0.5)):
            predicted = np.where(rng.random(30) < skill, labels, 1 - labels)
            order = rng.permutation(30) if method == "other" else np.arange(30)  # rows in another order
            preds = Predictions(np.eye(2)[predicted][order].astype(np.float32), None, labels[order],
                                np.full((30, 2), 0.5), order)
            run = tmp_path / f"{method}{seed}"
            runfiles.write_predictions(run, "test", preds, samples, WHEEL)
            read[method].append(runfiles.read_predictions(run))
            arrays[method].append((labels, predicted, [s.path for s in samples]))
    from_files = stats.compare_runs(read["head"], {"other": read["other"]}, n_boot=3000)["other"]
    from_arrays = stats.compare_runs(arrays["head"], {"other": arrays["other"]}, n_boot=3000)["other"]
    assert from_files == from_arrays
    assert from_files.bootstrap_units == 30  # images, each with its three seeds
