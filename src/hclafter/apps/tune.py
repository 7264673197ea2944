"""``hclafter tune``: a method's settings searched on the validation split with Optuna (TPE, seeded
with the config's seed; a median pruner on the validations of each trial), then the chosen
configuration trained and tested once, over seeds. Callable from a notebook as :func:`tune`.

What it writes in ``OUT``::

    study.db        the study (SQLite; --storage: any SQLAlchemy URL, or a journal file *.log / *.jsonl)
    splits/         the one split every trial and every final run reads (fixed: a final run's test images
                    are never a trial's training or validation images, whatever its seed)
    trials/NNNN/    one run per trial; its test split is never predicted (``evaluate_test=False``)
    best.yaml       the chosen configuration: ``hclafter train -c OUT/best.yaml`` trains it
    best/seedK/     the chosen configuration trained and tested, one run per seed
    tune.json       the trials, the best value and settings, the test results
    report.html     the optimisation history and the parameter importances

The method's search space is its config's ``tune.space`` (core/config.py checks it). A trial is
scored by :func:`trial_value`, which reads ``summary["val"]`` only; a trial's summary has no test
figures to read. A study stopped anywhere continues where it stopped when the same command runs
again: ``--trials`` is the study's total, and a trial a killed process left running is failed and
retried with the same settings.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from filelock import FileLock
from omegaconf import OmegaConf

from ..core.checkpoint import config_differences
from ..core.config import Config, ConfigError, SearchRange, TuneConfig, load_config, setting_kind, to_dict
from ..core.files import RunError, atomic_write_text, run_lock, write_json
from ..core.metrics import HEADLINE
from ..core.runtime import cache_dir_of
from ..core.stats import mean_std
from ..data.splits import load_splits, save_run_splits
from ..engine import runfiles
from ..engine.run import train_run
from ..models import check_config
from ..reporting.format import markdown_table
from ..reporting.html import Figure, Section, Table, write_html
from ..reporting.plots import plot_importances, plot_study_history
from .runs import train
from .workers import worker_pool

STUDY_NAME = "hclafter-tune"
ASK_LOCK = ".hclafter.ask.lock"  # in OUT: one process at a time draws a trial (``_run_trials``)
JOURNAL_SUFFIXES = (".log", ".jsonl")  # a --storage value ending so is a journal file, else an SQLAlchemy URL


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise RunError("hclafter tune needs Optuna: pip install 'hclafter[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def trial_value(summary: dict, objective: str) -> float:
    """The figure a trial is scored by: its validation ``objective`` (selection never reads test)."""
    return summary["val"][objective]


def open_storage(storage: Optional[str], out: Path) -> Any:
    """The study's storage: ``OUT/study.db`` (SQLite) by default, a journal file for a value ending in
    .log or .jsonl (many processes append to it safely), else any SQLAlchemy URL (e.g. PostgreSQL)."""
    optuna = _optuna()
    if storage is None:
        return f"sqlite:///{(out / 'study.db').resolve()}"
    if storage.endswith(JOURNAL_SUFFIXES):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(Path(storage).resolve())))
    return storage


def load_study(cfg: Config, storage: Optional[str], out: Path, name: str = STUDY_NAME, worker: int = 0) -> Any:
    """The study (created if new) with a TPE sampler seeded by ``cfg.seed`` (plus the worker's
    number, so parallel workers do not draw the same settings) and the configured pruner."""
    optuna = _optuna()
    t = cfg.tune
    pruner = optuna.pruners.MedianPruner(n_startup_trials=t.startup_trials) if t.pruner == "median" \
        else optuna.pruners.NopPruner()
    return optuna.create_study(storage=open_storage(storage, out), study_name=name, direction="maximize",
                               load_if_exists=True, pruner=pruner,
                               sampler=optuna.samplers.TPESampler(seed=(cfg.seed + worker) % 2**32,
                                                                  n_startup_trials=t.startup_trials))


def _suggest(trial: Any, entry: SearchRange, kind: type) -> float:
    if entry.choices is not None:
        return trial.suggest_categorical(entry.key, [kind(c) for c in entry.choices])
    if kind is int:
        return trial.suggest_int(entry.key, int(entry.low), int(entry.high), log=entry.log)
    return trial.suggest_float(entry.key, entry.low, entry.high, log=entry.log)


def configured(cfg: Config) -> dict[str, Any]:
    """The config's own value of every searched setting that lies in its range or among its choices:
    a new study's first trial, so that the chosen settings are never worse on validation than those
    tuning started from. A setting outside its space is left to the sampler."""
    tree, start = to_dict(cfg), {}
    for entry in cfg.tune.space:
        node: Any = tree
        for part in entry.key.split("."):
            node = node[int(part)] if isinstance(node, list) else node.get(part) if isinstance(node, dict) else None
        if isinstance(node, (int, float)) and not isinstance(node, bool) and (
                node in entry.choices if entry.choices is not None else entry.low <= node <= entry.high):
            start[entry.key] = node
    return start


def as_overrides(params: dict[str, Any]) -> list[str]:
    return [f"{key}={value!r}" for key, value in params.items()]


def _objective(trial: Any, configs: Sequence[str], overrides: Sequence[str], out: Path, progress: bool) -> float:
    """One trial: settings drawn from the space, a run in ``OUT/trials/NNNN`` that never predicts test,
    each validation told to the pruner."""
    base = load_config(configs, overrides)
    params = {e.key: _suggest(trial, e, setting_kind(base, e.key)) for e in base.tune.space}
    cfg = load_config(configs, [*overrides, *as_overrides(params)])
    folder = out / "trials" / f"{trial.number:04d}"
    trial.set_user_attr("run", str(folder.relative_to(out)))
    try:
        summary = train_run(cfg, folder, progress, on_validation=pruning(trial, cfg.tune), evaluate_test=False)
    except RunError as e:
        trial.set_user_attr("error", str(e))
        raise
    return trial_value(summary, cfg.tune.objective)


def pruning(trial: Any, tune: TuneConfig) -> Callable[[int, int, dict], None]:
    """A run's validation callback for ``trial``: each validation's objective is reported at its optimizer
    step, and once ``tune.warmup`` of the steps are done the pruner may stop the run (TrialPruned)."""
    optuna = _optuna()

    def report(step: int, total: int, val: dict) -> None:
        trial.report(val[tune.objective], step)
        if step >= tune.warmup * total and trial.should_prune():
            raise optuna.TrialPruned()

    return report


def _run_trials(configs: Sequence[str], overrides: Sequence[str], out: Path, storage: Optional[str], name: str,
                trials: int, worker: int, progress: bool) -> None:
    """``trials`` trials of the study in this process (worker number ``worker``, sharing the storage). A
    trial is drawn under ``OUT/ASK_LOCK``: SQLite has no row locks, so two processes asking at once would
    both pop the queued trial (the configured one, a retried one) and run it twice. A trial this process
    leaves unfinished (interrupted, killed) stays running, and the next start retries its settings."""
    optuna = _optuna()
    states = optuna.trial.TrialState
    study = load_study(load_config(configs, overrides), storage, out, name, worker)
    for _ in range(trials):
        with FileLock(str(out / ASK_LOCK)):
            trial = study.ask()
        try:
            value = _objective(trial, configs, overrides, out, progress)
        except optuna.TrialPruned:
            study.tell(trial, state=states.PRUNED)
        except RunError:  # e.g. a learning rate that diverges: the trial failed, the study goes on
            study.tell(trial, state=states.FAIL)
        else:
            study.tell(trial, value)


def _spent(study: Any) -> int:
    """Trials that count towards the budget: finished, pruned, or failed by an error of their own (a
    trial a killed process left is retried instead)."""
    states = _optuna().trial.TrialState
    return sum(t.state in (states.COMPLETE, states.PRUNED) or (t.state == states.FAIL and "error" in t.user_attrs)
               for t in study.trials)


def _retry_killed(study: Any) -> None:
    """Trials left running by a killed process (this command holds OUT's lock, so no live process runs
    them): marked failed, and their settings queued again."""
    states = _optuna().trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        study.tell(t.number, state=states.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})


def fixed_split(configs: Sequence[str], overrides: Sequence[str], folder: Path) -> list[str]:
    """The override that makes a run read one fixed split, written once to ``folder`` (before
    polarity labels: each run derives them itself); none when the config names its own."""
    cfg = load_config(configs, overrides)
    if cfg.data.splits_dir is not None:
        return []
    if not (folder / "test.csv").is_file():
        raw = load_config(configs, [*overrides, "data.polarity=false"])
        save_run_splits(folder, load_splits(raw.data, raw.seed, cache_dir_of(raw)))
    return [f"data.splits_dir={folder.resolve()}"]


def _check_same_study(study: Any, cfg: Config) -> None:
    """A study continues only with the settings it started with (else its trials answer another question)."""
    saved = study.user_attrs.get("config")
    if saved is None:
        study.set_user_attr("config", to_dict(cfg))
        return
    differs = config_differences(saved, to_dict(cfg), ignored=())
    if differs:
        raise ConfigError(f"the study in this storage was started with other settings ({'; '.join(differs[:6])}); "
                          "continue it with the same configs and overrides, or tune into another --out / --study")


def _test_best(configs: Sequence[str], overrides: Sequence[str], out: Path, seeds: Sequence[int],
               progress: bool, figures: bool) -> dict[int, dict]:
    """The chosen configuration trained and tested once per seed (finished runs are read back,
    interrupted ones resumed): the only runs of the study that predict test."""
    summaries = {}
    for seed in seeds:
        folder = out / "best" / f"seed{seed}"
        if runfiles.is_finished(folder):
            summaries[seed] = runfiles.read_summary(folder)
            continue
        cfg = load_config(configs, [*overrides, f"seed={seed}"])
        summaries[seed] = train(cfg, folder, progress, resume=(folder / "checkpoints" / "latest.json").is_file(),
                                figures=figures)
    return summaries


def _trial_rows(study: Any) -> list[dict]:
    return [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
             "last_validation": t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None,
             "run": t.user_attrs.get("run"), **({"error": t.user_attrs["error"]} if "error" in t.user_attrs else {})}
            for t in study.trials]


def _importances(study: Any, cfg: Config) -> tuple[dict[str, float], str]:
    """fANOVA importances of the tuned settings, or why there are none."""
    optuna = _optuna()
    finished = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
    if len(cfg.tune.space) < 2:
        return {}, "Importances compare two or more tuned settings; this space has fewer."
    if finished < cfg.tune.importance_trials:
        return {}, (f"No importances: {finished} finished trial(s), fewer than tune.importance_trials = "
                    f"{cfg.tune.importance_trials}, would rank noise.")
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=cfg.seed)
    importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    return {k: float(v) for k, v in importances.items()}, ""


def _check(configs: Sequence[str], overrides: Sequence[str], **counts: int) -> None:
    """The command's numbers and the config checked before the study's lock is taken."""
    for flag, value in counts.items():
        if value < 1:
            raise ConfigError(f"--{flag} must be at least 1, got {value}")
    cfg = load_config(configs, overrides)
    check_config(cfg)
    if cfg.mode != "train":
        raise ConfigError(f"mode={cfg.mode} trains nothing, so there is nothing to tune; run it with hclafter train")


def _counts(states: Sequence[str]) -> dict[str, int]:
    return {s: list(states).count(s) for s in ("COMPLETE", "PRUNED", "FAIL")}


def _study(configs: Sequence[str], overrides: Sequence[str], out: Path, trials: int, storage: Optional[str],
           workers: int, study_name: str, progress: bool) -> tuple[Config, Any, int, Any]:
    """Under OUT's lock: the trials the study still lacks of ``trials`` in all, in ``workers`` local
    processes; writes ``OUT/best.yaml``. Returns the study's config (its split fixed), the study, its
    budget and its best trial."""
    optuna = _optuna()
    overrides = [*overrides, *fixed_split(configs, overrides, out / "splits")]
    cfg = load_config(configs, overrides)
    study = load_study(cfg, storage, out, study_name)
    _check_same_study(study, cfg)
    if not study.trials and configured(cfg):
        study.enqueue_trial(configured(cfg), user_attrs={"configured": True})
    budget = trials if cfg.tune.space else 1  # nothing to search: one trial is the method's own choice
    _retry_killed(study)
    todo = max(0, budget - _spent(study))
    shares = [todo // workers + (w < todo % workers) for w in range(workers)]
    args = [(configs, overrides, out, storage, study_name, n, w, progress) for w, n in enumerate(shares) if n]
    if workers == 1 or len(args) <= 1:  # a finished study has nothing left to run
        for a in args:
            _run_trials(*a)
    else:
        with worker_pool(len(args)) as pool:
            for done in [pool.submit(_run_trials, *a) for a in args]:
                done.result()
    study = load_study(cfg, storage, out, study_name)
    if not study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        errors = [t.user_attrs["error"] for t in study.trials if "error" in t.user_attrs]
        raise RunError(f"{out}: no trial finished" + (f"; the first error: {errors[0]}" if errors else ""))
    best = study.best_trial
    best_cfg = load_config(configs, [*overrides, *as_overrides(best.params)])
    atomic_write_text(out / "best.yaml", f"# chosen by hclafter tune on validation {cfg.tune.objective}: trial "
                                         f"{best.number}, {best.value:.4f}\n"
                                         + OmegaConf.to_yaml(OmegaConf.structured(best_cfg)))
    return cfg, study, budget, best


def search(configs: Sequence[str | Path], overrides: Sequence[str], out: str | Path, trials: int,
           workers: int = 1, progress: bool = False) -> dict:
    """The study alone, without a test run: what a sweep that tunes every method with the same
    budget runs before its seeds (``apps.sweep``). Resumable like :func:`tune`; writes
    ``OUT/best.yaml`` and ``OUT/search.json`` and returns what the latter holds: the budget, the
    trials' states, the best trial's number, validation value and settings."""
    configs, out = [str(c) for c in configs], Path(out)
    _check(configs, overrides, trials=trials, workers=workers)
    with run_lock(out):
        cfg, study, budget, best = _study(configs, overrides, out, trials, None, workers, STUDY_NAME, progress)
        record = {"objective": cfg.tune.objective, "budget": budget,
                  "counts": _counts([t.state.name for t in study.trials]),
                  "best": {"trial": best.number, "value": best.value, "params": best.params}}
        write_json(out / "search.json", record)
    return record


def tune(configs: Sequence[str | Path], overrides: Sequence[str], out: str | Path, trials: int, seeds: int = 1,
         storage: Optional[str] = None, workers: int = 1, study_name: str = STUDY_NAME, progress: bool = False,
         figures: bool = True) -> dict:
    """Tune the configured method on validation into ``out`` (see the module's docstring), running the
    trials the study still lacks of ``trials`` in all, in ``workers`` local processes; then train and
    test the chosen configuration over ``seeds`` seeds (the config's seed and the next ones; their
    figures unless ``figures`` is false). Returns what ``OUT/tune.json`` holds."""
    configs, out = [str(c) for c in configs], Path(out)
    _check(configs, overrides, trials=trials, seeds=seeds, workers=workers)
    with run_lock(out):
        cfg, study, budget, best = _study(configs, overrides, out, trials, storage, workers, study_name, progress)
        summaries = _test_best([str(out / "best.yaml")], [], out, range(cfg.seed, cfg.seed + seeds), progress,
                               figures)
        record = _record(study, cfg, budget, best, summaries, storage, out)
        importances, why_not = _importances(study, cfg)
        record["importances"] = importances
        write_json(out / "tune.json", record)
        write_report(out, record, why_not)
    return record


def _record(study: Any, cfg: Config, budget: int, best: Any, summaries: dict[int, dict], storage: Optional[str],
            out: Path) -> dict:
    rows = _trial_rows(study)
    test = {}
    for metric in HEADLINE:
        mean, std = mean_std([s["test"][metric] for s in summaries.values()])
        test[metric] = {"mean": mean, "std": None if math.isnan(std) else std}
    return {"study": study.study_name, "storage": storage or str(out / "study.db"), "objective": cfg.tune.objective,
            "budget": budget, "counts": _counts([r["state"] for r in rows]),
            "best": {"trial": best.number, "value": best.value, "params": best.params, "config": "best.yaml"},
            "test": {"seeds": sorted(summaries), **test,
                     "per_seed": {str(seed): {k: s["test"][k] for k in HEADLINE} for seed, s in summaries.items()}},
            "trials": rows}


def _chosen(params: dict[str, Any]) -> list[list[str]]:
    return [[k, f"{v:.4g}"] for k, v in params.items()] or [["(nothing searched: tune.space is empty)", "–"]]


def write_report(out: Path, record: dict, why_no_importances: str = "") -> Path:
    """``OUT/report.html``: the study in numbers, its history, the importances and the test results."""
    plots = out / "plots"
    plot_study_history(record["trials"], plots / "history.png", f"validation {record['objective']}")
    c, best = record["counts"], record["best"]
    study = [f"{len(record['trials'])} trial(s) for a budget of {record['budget']}: {c['COMPLETE']} finished, "
             f"{c['PRUNED']} pruned, {c['FAIL']} failed (failed ones a killed process left were retried). Every "
             f"trial is scored on the validation split only; none predicts test. Storage: `{record['storage']}`.",
             Table(["setting", "chosen"], _chosen(best["params"]),
                   caption=f"Trial {best['trial']}, validation {record['objective']} {best['value']:.4f}; "
                           "`hclafter train -c best.yaml` trains it.")]
    importance: list = [why_no_importances]
    if record["importances"]:
        plot_importances(record["importances"], plots / "importances.png")
        importance = [Figure(plots / "importances.png", "fANOVA importance of each tuned setting for the "
                                                        f"validation {record['objective']} (sums to 1).")]
    test = record["test"]
    rows = [[seed, *(f"{m[k]:.4f}" for k in HEADLINE)] for seed, m in test["per_seed"].items()]
    rows.append(["mean ± std", *(f"{test[k]['mean']:.4f}" + (f" ± {test[k]['std']:.4f}" if test[k]["std"] is not None
                                                             else "") for k in HEADLINE)])
    sections = [Section("Study", study),
                Section("Optimisation history", [Figure(plots / "history.png", "Each trial's validation figure; "
                                                        "pruned trials at their last validation; the line is the "
                                                        "best so far.")]),
                Section("Parameter importances", importance),
                Section("Test, once, for the chosen configuration",
                        [Table(["seed", *HEADLINE], rows, caption="The only runs of the study that predict test.")])]
    return write_html(out / "report.html", "Tuning on validation", sections, subtitle=f"study `{record['study']}`")


def cmd_tune(args: argparse.Namespace) -> int:
    from ..engine.loop import TrainingInterrupted

    try:
        record = tune(args.config, args.overrides, args.out, args.trials, args.seeds, args.storage, args.workers,
                      args.study or STUDY_NAME, progress=not args.quiet, figures=args.figures)
    except TrainingInterrupted as e:  # its message names the trial's run; the study is what continues
        raise TrainingInterrupted(f"tuning interrupted by signal {e.signum}; run the same command again to continue "
                                  "the study", e.signum) from None
    best, test = record["best"], record["test"]
    print(markdown_table(["setting", "chosen"], _chosen(best["params"])))
    spread = "" if test["accuracy"]["std"] is None else f" ± {test['accuracy']['std']:.4f}"
    print(f"best of {record['budget']} trial(s): #{best['trial']}, validation {record['objective']} "
          f"{best['value']:.4f}; test accuracy {test['accuracy']['mean']:.4f}{spread} over {len(test['seeds'])} "
          f"seed(s)\nwritten: {Path(args.out) / 'best.yaml'}, tune.json, report.html")
    return 0
