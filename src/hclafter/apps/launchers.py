"""Where a sweep runs: here, one run after another (``hclafter sweep``), or on a cluster, every
unfinished run as one task of a SLURM job array submitted through submitit, with the results
tables written once the jobs have finished (``--launcher slurm``, ``--collect``).

The sweep file's ``slurm:`` key sets what each run gets::

    slurm:
      partition: gpu          # required
      gpus_per_run: 1         # one process per GPU; 0 for CPU-only runs
      time_limit: "4:00:00"   # per run: minutes, "H:MM:SS" or "D-HH:MM:SS"
      array_parallelism: 8    # runs of the array at a time
      cpus_per_run: 8         # optional, and so are the following
      mem_gb: 64
      account: my-project
      qos: normal
      setup: ["source /path/to/.venv/bin/activate"]   # shell lines before each job
      additional: {constraint: a100}                  # any other sbatch option

Runs keep the sweep's skip/resume behaviour: finished runs are not submitted, runs still queued or
running from an earlier submission are not submitted twice, runs made with other settings than the
sweep now plans are refused (or, with ``--rerun-changed``, submitted afresh), and a job starts a run
afresh or resumes it from its last saved state. A job that reaches its time limit is requeued by submitit and
resumes where the run last saved (``train.state_every_s``, ``train.checkpoint_every_steps``).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from ..core.config import ConfigError, load_config
from ..core.files import RunError, clear_run_dir, run_lock, write_json
from .sweep import SweepRun, changed_runs, plan, run_sweep, run_status, write_results

ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                 "REQUEUE_HOLD", "REQUEUE_FED"}


class LaunchError(RunError):
    """Jobs cannot be submitted, or a submitted sweep has not finished."""


@dataclass
class SlurmSettings:
    partition: str
    gpus_per_run: int = 1
    time_limit_min: int = 60
    array_parallelism: int = 16
    cpus_per_run: Optional[int] = None
    mem_gb: Optional[int] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    setup: list[str] = field(default_factory=list)
    additional: dict[str, Any] = field(default_factory=dict)


def _minutes(value: Any, where: str) -> int:
    """SLURM's time formats (minutes, M:SS, H:MM:SS, D-HH[:MM[:SS]]) as whole minutes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(value).strip())
    if not match or isinstance(value, bool):
        raise ConfigError(f"{where}: {value!r} is not a time limit; give minutes (240) or 'H:MM:SS' ('4:00:00')")
    days, a, b, c = (int(g) if g else None for g in match.groups())
    if days is not None:
        hours, minutes, seconds = a, b or 0, c or 0
    elif c is not None:
        hours, minutes, seconds = a, b, c
    elif b is not None:
        hours, minutes, seconds = 0, a, b
    else:
        hours, minutes, seconds = 0, a, 0
    total = (days or 0) * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    if total <= 0:
        raise ConfigError(f"{where}: the time limit must be positive, got {value!r}")
    return total


def slurm_settings(sweep_file: Path) -> SlurmSettings:
    """The ``slurm:`` key of a sweep file, checked."""
    spec = yaml.safe_load(Path(sweep_file).read_text(encoding="utf-8")) or {}
    section = spec.get("slurm")
    if not isinstance(section, dict) or not section.get("partition"):
        raise ConfigError(f"{sweep_file}: --launcher slurm needs a 'slurm:' key with at least 'partition' "
                          "(and usually gpus_per_run, time_limit, array_parallelism); see hclafter.launchers")
    known = {"partition", "gpus_per_run", "time_limit", "array_parallelism", "cpus_per_run", "mem_gb", "account",
             "qos", "setup", "additional"}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"{sweep_file}: unknown slurm keys {unknown}; expected {sorted(known)}")
    settings = SlurmSettings(partition=str(section["partition"]))
    for key in ("gpus_per_run", "array_parallelism", "cpus_per_run", "mem_gb"):
        if key in section:
            value = section[key]
            low = 0 if key == "gpus_per_run" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{sweep_file}: slurm.{key} must be an integer >= {low}, got {value!r}")
            setattr(settings, key, value)
    if "time_limit" in section:
        settings.time_limit_min = _minutes(section["time_limit"], f"{sweep_file}: slurm.time_limit")
    for key in ("account", "qos"):
        if section.get(key) is not None:
            setattr(settings, key, str(section[key]))
    setup = section.get("setup") or []
    if not isinstance(setup, list) or not all(isinstance(line, str) for line in setup):
        raise ConfigError(f"{sweep_file}: slurm.setup must be a list of shell lines")
    additional = section.get("additional") or {}
    if not isinstance(additional, dict):
        raise ConfigError(f"{sweep_file}: slurm.additional must map sbatch options to values")
    settings.setup, settings.additional = setup, additional
    return settings


class RunJob:
    """One run of a sweep as a job: skipped when finished, started afresh or resumed otherwise.
    ``checkpoint`` makes submitit requeue it at its time limit (the run then resumes)."""

    def __call__(self, configs: Sequence[str], overrides: Sequence[str], out: str) -> str:
        import submitit
        from submitit.helpers import TorchDistributedEnvironment

        from ..engine import runfiles
        from .runs import train

        out_dir = Path(out)
        if runfiles.is_finished(out_dir):
            return "done earlier"
        if submitit.JobEnvironment().num_tasks > 1:  # one process per GPU: what accelerate reads
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        resume = (out_dir / "checkpoints" / "latest.json").is_file()
        print(f"{'resuming' if resume else 'starting'} {out_dir}", flush=True)  # the job's log
        train(load_config(list(configs), list(overrides)), out_dir, progress=False, resume=resume)
        return "resumed and finished" if resume else "finished"

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def _submitit() -> Any:
    try:
        import submitit
    except ImportError as e:
        raise LaunchError(f"--launcher slurm needs the optional package {e.name!r}: pip install 'hclafter[slurm]'") \
            from None
    return submitit


def _executor(folder: Path, settings: SlurmSettings, cluster: str, name: str) -> Any:
    submitit = _submitit()
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    tasks = max(1, settings.gpus_per_run)
    params: dict[str, Any] = {"name": name, "timeout_min": settings.time_limit_min, "nodes": 1,
                              "tasks_per_node": tasks, "gpus_per_node": settings.gpus_per_run,
                              "slurm_partition": settings.partition,
                              "slurm_array_parallelism": settings.array_parallelism}
    if settings.cpus_per_run:
        params["cpus_per_task"] = max(1, settings.cpus_per_run // tasks)
    if settings.mem_gb:
        params["mem_gb"] = settings.mem_gb
    for key in ("account", "qos"):
        if getattr(settings, key):
            params[f"slurm_{key}"] = getattr(settings, key)
    if settings.setup:
        params["slurm_setup"] = settings.setup
    if settings.additional:
        params["slurm_additional_parameters"] = settings.additional
    executor.update_parameters(**params)
    return executor


def _ledger(out_dir: Path) -> dict[str, dict]:
    """Run directory → its latest submission (job id, cluster), from ``OUT/slurm/jobs.json``."""
    path = out_dir / "slurm" / "jobs.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _job_state(entry: dict, folder: Path) -> str:
    submitit = _submitit()
    if entry["cluster"] == "slurm":
        return submitit.SlurmJob(folder=folder, job_id=entry["job_id"]).state
    return submitit.LocalJob(folder=folder, job_id=entry["job_id"]).state


def submit(sweep_file: Path, out_dir: Path, overrides: Sequence[str] = (), cluster: str = "slurm",
           rerun_changed: bool = False) -> list[Any]:
    """Submit every unfinished run of the sweep as one job array; return the submitit jobs.
    ``cluster="local"`` runs the same jobs as subprocesses here (submitit's local executor)."""
    settings = slurm_settings(sweep_file)
    runs = plan(sweep_file, out_dir, overrides).runs
    if cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise LaunchError("--launcher slurm: sbatch/srun not found; submit from a SLURM login node")
    folder = out_dir / "slurm"
    ledger = _ledger(out_dir)
    changed = changed_runs(runs, rerun_changed)
    todo: list[SweepRun] = []
    for run in runs:
        name = f"{run.dataset} / {run.method}{' / ' + run.variant if run.variant else ''} / seed {run.seed}"
        status = "new" if run.out in changed else run_status(run)
        if status == "done":
            print(f"{name}: done earlier, skipped")
            continue
        entry = ledger.get(str(run.out))
        if entry and entry["cluster"] == cluster and _job_state(entry, folder) in ACTIVE_STATES:
            print(f"{name}: still queued or running as job {entry['job_id']}, not submitted again")
            continue
        if status == "new" and run.out.exists():
            with run_lock(run.out):  # fails if a run is writing it
                clear_run_dir(run.out)  # never reached a saved state, or made with other settings: nothing to keep
        todo.append(run)
    if not todo:
        print("nothing to submit")
        return []
    executor = _executor(folder, settings, cluster, f"hclafter-{Path(sweep_file).stem}")
    job = RunJob()
    jobs = executor.map_array(job, [[str(p) for p in r.configs] for r in todo], [list(r.overrides) for r in todo],
                              [str(r.out) for r in todo])
    for run, submitted in zip(todo, jobs):
        ledger[str(run.out)] = {"job_id": submitted.job_id, "cluster": cluster, "submitted": time.time()}
    write_json(folder / "jobs.json", ledger)
    print(f"submitted {len(jobs)} run(s) as job array {jobs[0].job_id.split('_')[0]} (logs in {folder})")
    return jobs


def collect(sweep_file: Path, out_dir: Path, overrides: Sequence[str] = ()) -> list[dict]:
    """Write the results tables once every run has finished; otherwise say which have not, with
    their job state and log file."""
    sweep = plan(sweep_file, out_dir, overrides)
    runs = sweep.runs
    changed_runs(runs)  # results made with other settings than planned are not tabulated
    missing = [run for run in runs if run_status(run) != "done"]
    if missing:
        ledger, folder = _ledger(out_dir), out_dir / "slurm"
        lines = []
        for run in missing:
            entry = ledger.get(str(run.out))
            if entry is None:
                lines.append(f"  {run.out}: never submitted")
                continue
            paths = _submitit().core.utils.JobPaths(folder, job_id=entry["job_id"], task_id=0)
            lines.append(f"  {run.out}: job {entry['job_id']} {_job_state(entry, folder)}, log {paths.stderr}")
        raise LaunchError(f"{len(missing)} of {len(runs)} runs have not finished:\n" + "\n".join(lines) +
                          "\nrun --collect again when they have; a failed run is started again by submitting the "
                          "sweep again (finished runs are skipped, interrupted ones resumed)")
    return write_results(sweep, out_dir)


def cluster_sweep(sweep_file: Path, out_dir: Path, overrides: Sequence[str] = (), launcher: Optional[str] = None,
                  wait: bool = False, cluster: Optional[str] = None, rerun_changed: bool = False) -> int:
    """``hclafter sweep --launcher slurm [--wait] [--rerun-changed]``, and ``--collect`` (no launcher);
    ``cluster`` replaces the launcher's submitit cluster (``local``: subprocesses on this machine)."""
    if launcher is not None:
        if plan(sweep_file, out_dir, overrides).tune_trials:
            raise LaunchError(f"{sweep_file} tunes every method first (tune:), which runs here: hclafter sweep "
                              f"{sweep_file} --out {out_dir} [--workers N]; or tune each method with hclafter tune (--storage "
                              "lets many workers share a study) and list each OUT/best.yaml in a sweep without tune:")
        jobs = submit(sweep_file, out_dir, overrides, cluster or launcher, rerun_changed)
        if not wait:
            if jobs:
                print(f"when they have finished: hclafter sweep {sweep_file} --out {out_dir} --collect")
            return 0
        for job in jobs:
            try:
                job.result()
            except Exception as e:  # the job's own error, reported by submitit with its log
                print(f"job {job.job_id} failed: {str(e).strip().splitlines()[-1]}  (log: {job.paths.stderr})")
    elif wait:
        raise LaunchError("--wait applies to --launcher slurm; to write the tables of a submitted sweep use --collect")
    collect(sweep_file, out_dir, overrides)
    print(f"results: {out_dir / 'results.md'} and results.csv; plots in {out_dir / 'plots'}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.launcher or args.collect or args.wait:
        if args.workers != 1:
            raise ConfigError("--workers runs the sweep here; with --launcher, --wait or --collect the cluster runs it")
        return cluster_sweep(Path(args.sweep), Path(args.out), args.overrides, launcher=args.launcher, wait=args.wait,
                             rerun_changed=args.rerun_changed)
    run_sweep(Path(args.sweep), Path(args.out), args.overrides, progress=not args.quiet,
              rerun_changed=args.rerun_changed, workers=args.workers)
    print(f"results: {Path(args.out) / 'results.md'} and results.csv; plots in {Path(args.out) / 'plots'}")
    return 0
