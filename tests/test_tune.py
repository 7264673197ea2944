"""``hclafter tune`` (issue 25, points 1 and 3): a killed study resumes to its budget, selection never
reads test labels, and bad search spaces are one-line errors naming the key."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time

import pytest

from hclafter.apps import tune as tune_module
from hclafter.apps.cli import main
from hclafter.core.checkpoint import config_differences
from hclafter.core.config import ConfigError, TuneConfig, load_config, to_dict
from hclafter.core.runtime import cache_dir_of
from hclafter.data.splits import load_splits, save_run_splits
from hclafter.engine import runfiles
from hclafter.engine.run import train_run

from .conftest import ROOT, TINY_CONFIG

optuna = pytest.importorskip("optuna")

SPACE = ("tune.space=[{key: train.loss.lam, low: 0, high: 1}, "
         "{key: train.lr.stage_adapters, low: 1e-4, high: 1e-1, log: true}]")


def micro(cache_dir) -> list[str]:
    """Two one-epoch phases on 12 images per class: a trial takes about a second."""
    return [f"cache_dir={cache_dir}", "data.synthetic.per_class=12", "data.synthetic.image_size=32", "text.steps=20",
            "train.log_with=[]", "train.phases=[{epochs: 1, train: [stage_adapters, fusion]}, "
                                 "{epochs: 1, train: [stage_adapters, fusion, nga, prompts]}]", SPACE,
            "tune.startup_trials=1"]  # TPE and the pruner use the values from the second trial on


def test_a_killed_study_resumes_to_its_budget(tmp_path, cache_dir):
    out = tmp_path / "study"
    args = ["tune", "-c", str(TINY_CONFIG), "--trials", "3", "--out", str(out), "--quiet", "--no-figures",
            *micro(cache_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    first = subprocess.Popen([sys.executable, "-m", "hclafter", *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "trials" / "0001").is_dir():  # trial 0 is finished in the storage, trial 1 has started
        assert first.poll() is None and time.time() < deadline, "the study ended or stalled before trial 1"
        time.sleep(0.05)
    first.kill()
    first.wait()
    assert main(args) == 0  # the same command again (here, in this process)
    study = optuna.load_study(study_name="hclafter-tune", storage=f"sqlite:///{out / 'study.db'}")
    states = [t.state.name for t in study.trials]
    assert sum(s in ("COMPLETE", "PRUNED") for s in states) == 3 and states.count("FAIL") == 1, states
    killed = next(t for t in study.trials if t.state.name == "FAIL")
    retry = next(t for t in study.trials if t.user_attrs.get("retry_of") == killed.number)
    assert retry.params == killed.params  # the killed trial ran again with its settings
    # Trials told the pruner their validations and never predicted test; the chosen configuration did, once.
    record = runfiles.read_summary(out / "best" / "seed0")
    assert "test" in record and load_config([out / "best.yaml"]).train.loss.lam == study.best_params["train.loss.lam"]
    for t in study.trials:
        if t.state.name == "COMPLETE":
            assert t.intermediate_values
            assert "test" not in runfiles.read_summary(out / t.user_attrs["run"])
            assert not (out / t.user_attrs["run"] / "predictions.csv").exists()
    assert main(["report", str(out / "trials" / "0000")]) == 2  # refused by name, not a traceback
    # Once the budget is spent, the same command runs no trial.
    assert main(args) == 0
    assert len(optuna.load_study(study_name="hclafter-tune", storage=f"sqlite:///{out / 'study.db'}").trials) == \
        len(states) and (out / "report.html").is_file()


def _split_folders(tmp_path, cache_dir):
    """The study's split, and a copy whose test labels (and distributions) are permuted: row i takes
    those of row n-1-i, so that nearly every test image changes class."""
    cfg = load_config([TINY_CONFIG], micro(cache_dir))
    plain, permuted = tmp_path / "splits", tmp_path / "permuted"
    save_run_splits(plain, load_splits(cfg.data, cfg.seed, cache_dir_of(cfg)))
    shutil.copytree(plain, permuted)
    with open(plain / "test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    labels = [(r["label"], r["distribution"]) for r in rows][::-1]
    assert sum(a != b for a, b in zip(labels, [(r["label"], r["distribution"]) for r in rows])) > len(rows) // 2
    with open(permuted / "test.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "label": label, "distribution": dist} for r, (label, dist) in zip(rows, labels))
    return plain, permuted


def _trials(tmp_path, cache_dir, splits, name, trials=3):
    record = tune_module.tune([TINY_CONFIG], [*micro(cache_dir), f"data.splits_dir={splits}"], tmp_path / name,
                              trials=trials, figures=False)
    return [(t["state"], t["value"], t["params"]) for t in record["trials"]], record


def test_permuted_test_labels_change_no_trial_value_and_no_choice(tmp_path, cache_dir):
    plain, permuted = _split_folders(tmp_path, cache_dir)
    trials, record = _trials(tmp_path, cache_dir, plain, "plain")
    trials_permuted, record_permuted = _trials(tmp_path, cache_dir, permuted, "permuted")
    assert trials == trials_permuted and record["best"] == record_permuted["best"]
    assert record["test"] != record_permuted["test"]  # the permutation reached the test results


def test_the_permutation_test_fails_if_trials_are_scored_on_test(tmp_path, cache_dir, monkeypatch):
    """The test above has teeth: a tuner whose trials predict test and are scored on it gives other
    trial values when the test labels are permuted."""
    monkeypatch.setattr(tune_module, "train_run", lambda *a, **k: train_run(*a, **{**k, "evaluate_test": True}))
    monkeypatch.setattr(tune_module, "trial_value", lambda summary, objective: summary["test"][objective])
    plain, permuted = _split_folders(tmp_path, cache_dir)
    # two trials: the first is the config's own settings, on which the tiny random model may predict one
    # class for every image, an accuracy that permuting the labels cannot move
    values = [_trials(tmp_path, cache_dir, splits, name, 2)[0] for splits, name in ((plain, "a"), (permuted, "b"))]
    assert values[0] != values[1]


def test_a_run_recorded_without_a_tune_section_is_the_same_run():
    """The tune section never changes what a run computes: runs made before it existed (or under another
    search space) compare equal; a study, though, continues only under its own space."""
    cfg = to_dict(load_config([TINY_CONFIG]))
    older = {k: v for k, v in cfg.items() if k != "tune"}
    assert config_differences(older, cfg) == [] and config_differences(older, cfg, ignored=())


@pytest.mark.parametrize("space, message", [
    ("[{key: train.lr.nope, low: 1e-4, high: 1e-2}]", r"tune.space.0 \(train.lr.nope\): not a numeric setting"),
    ("[{key: seed, low: 0, high: 9}]", r"tune.space.0 \(seed\): not a numeric setting a trial may change"),
    ("[{key: train.loss.name, choices: [1]}]", r"tune.space.0 \(train.loss.name\): not a numeric setting"),
    ("[{key: train.loss.lam, low: 0.5, high: 2}]", r"tune.space.0 \(train.loss.lam\): 2.0 is outside "
                                                   r"train.loss.lam's range \[0, 1\]"),
    ("[{key: train.loss.lam, low: 0.5, high: 0.5}]", r"tune.space.0 \(train.loss.lam\): needs low < high"),
    ("[{key: train.weight_decay, low: 0, high: 0.1, log: true}]", r"\(train.weight_decay\): a log scale needs low > 0"),
    ("[{key: model.prompt_tokens, choices: [4, 6.5]}]", r"\(model.prompt_tokens\): model.prompt_tokens is a whole "
                                                        r"number; 6.5 is not"),
    ("[{key: model.prompt_tokens, choices: [4], low: 1}]", r"\(model.prompt_tokens\): give either"),
    ("[{key: train.loss.lam, low: 0, high: 1}, {key: train.loss.lam, low: 0, high: 1}]",
     r"tune.space.1 \(train.loss.lam\): tuned twice"),
    ("[{key: train.loss.lam, low: nan, high: 1}]", r"tune.space.0.low must be a finite number"),
])
def test_bad_search_spaces_are_one_line_errors_naming_the_key(space, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config([TINY_CONFIG], [f"tune.space={space}"])
    assert "\n" not in str(info.value)


def test_the_command_reports_bad_settings_and_a_missing_optuna_in_one_line(tmp_path, monkeypatch, capsys):
    args = ["tune", "-c", str(TINY_CONFIG), "--trials", "2", "--out", str(tmp_path / "t")]
    assert main([*args, "tune.space=[{key: train.lr.nope, low: 1, high: 2}]"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if not installed
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == "error: hclafter tune needs Optuna: pip install 'hclafter[tune]'"


def test_a_tuning_sweep_gives_every_method_the_same_trials_before_its_seeds(tmp_path, cache_dir):
    """Issue 25, point 2: ``tune: {trials: N}`` in a sweep file tunes each method with a search space
    on validation with N trials, on one split per dataset that every run then reads; the tables say so."""
    import yaml

    from hclafter.apps.sweep import plan, run_sweep
    from hclafter.core.files import read_json

    methods = ROOT / "configs" / "methods"
    sweep, out = tmp_path / "sweep.yaml", tmp_path / "out"
    spec = {"base": [str(TINY_CONFIG)], "methods": {"zeroshot": str(methods / "zeroshot.yaml"),
                                                    "hybrid": str(methods / "hybrid.yaml")},
            "overrides": micro(cache_dir), "headline": "hybrid", "seeds": [0, 1], "tune": {"trials": 2}}
    sweep.write_text(yaml.safe_dump(spec, sort_keys=False))
    run_sweep(sweep, out, progress=False)
    study = out / "tuning" / "default" / "hybrid" / "default"
    found = read_json(study / "search.json")
    assert found["budget"] == 2 and found["counts"]["COMPLETE"] + found["counts"]["PRUNED"] == 2
    assert not (out / "tuning" / "default" / "zeroshot").exists()  # nothing to tune
    splits = str((out / "tuning" / "default" / "splits").resolve())
    for seed in (0, 1):
        hybrid = load_config([out / "runs" / "default" / "hybrid" / "default" / f"seed{seed}" / "config.yaml"])
        zeroshot = load_config([out / "runs" / "default" / "zeroshot" / "default" / f"seed{seed}" / "config.yaml"])
        assert hybrid.data.splits_dir == zeroshot.data.splits_dir == splits  # seeds vary training alone
        assert hybrid.train.loss.lam == pytest.approx(found["best"]["params"]["train.loss.lam"])
        assert hybrid.seed == seed
    assert "the same 2 trial(s)" in (out / "results.md").read_text()
    trials = sorted((study / "trials").iterdir())
    run_sweep(sweep, out, progress=False, workers=2)  # again: the study is complete, nothing runs twice
    assert sorted((study / "trials").iterdir()) == trials
    for bad in ({"trials": 0}, {"trials": "2"}, {"trial": 2}, 3):
        sweep.write_text(yaml.safe_dump({**spec, "tune": bad}))
        with pytest.raises(ConfigError, match=r"tune: .*write tune: \{trials: N\}"):
            plan(sweep, out)


def test_a_new_study_starts_from_the_configured_settings(tmp_path, cache_dir):
    """The first trial is the config's own values of the searched settings (those inside the space),
    so tuning cannot choose worse on validation than where it started; one outside its range is sampled."""
    overrides = [*micro(cache_dir), "train.loss.lam=0.3", "train.lr.stage_adapters=0.5"]  # 0.5: above the space's 1e-1
    cfg = load_config([TINY_CONFIG], overrides)
    assert tune_module.configured(cfg) == {"train.loss.lam": 0.3}
    tune_module.search([TINY_CONFIG], overrides, tmp_path / "study", trials=1)
    study = optuna.load_study(study_name="hclafter-tune", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}")
    first = study.trials[0]
    assert first.params["train.loss.lam"] == 0.3 and first.user_attrs["configured"] is True
    assert 1e-4 <= first.params["train.lr.stage_adapters"] <= 1e-1


def test_the_pruner_waits_for_the_warmup_share_of_a_runs_steps():
    """A converged run validates hundreds of times and its first phases train part of the model: a trial
    below the median is stopped only once ``tune.warmup`` of its steps are done, and then it is."""
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    earlier = study.ask()
    for step in (10, 20, 30):
        earlier.report(0.9, step)
    study.tell(earlier, 0.9)
    report = tune_module.pruning(study.ask(), TuneConfig(warmup=0.5))
    report(10, 40, {"accuracy": 0.1})  # a quarter of the way, far below the median: kept
    with pytest.raises(optuna.TrialPruned):
        report(20, 40, {"accuracy": 0.1})


def test_two_workers_run_the_configured_first_trial_once(tmp_path, cache_dir):
    """Both processes of a new study ask for a trial at the same moment; the queued configured trial
    must go to one of them (SQLite has no row locks: without the ask lock both ran it, and the second
    failed on the first's run lock, spending a trial of the budget)."""
    out = tmp_path / "study"
    tune_module.search([TINY_CONFIG], micro(cache_dir), out, trials=2, workers=2)
    study = optuna.load_study(study_name="hclafter-tune", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert [t.user_attrs.get("configured", False) for t in study.trials] == [True, False]
