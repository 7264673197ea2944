"""Sweeps as SLURM job arrays through submitit: the real jobs run with submitit's local executor
(subprocesses), the SLURM side against stand-in ``sbatch``/``sacct`` commands that record what
they were given."""
import json
import os
import stat

import pytest

from hclafter.apps.cli import main
from hclafter.core.config import ConfigError

from .conftest import TINY_CONFIG
from .tiny_runs import FAST

pytest.importorskip("submitit", reason="needs hclafter[slurm]")
from hclafter.apps.launchers import LaunchError, _minutes, cluster_sweep, slurm_settings  # noqa: E402


def _sweep(path, cache_dir, slurm="{partition: debug, gpus_per_run: 0, time_limit: 15, array_parallelism: 2}",
           seeds="[0, 1]"):
    overrides = [*FAST, "data.synthetic.per_class=8", "text.steps=20", f"cache_dir={cache_dir}"]
    path.write_text(f"base: [{TINY_CONFIG}]\nmethods: {{hybrid: []}}\noverrides: {json.dumps(overrides)}\n"
                    f"seeds: {seeds}\nslurm: {slurm}\n")
    return path


def _runs(out):
    return [out / "runs" / "default" / "hybrid" / "default" / f"seed{s}" for s in (0, 1)]


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, cache_dir):
    """Two runs as a job array of real subprocesses (submitit's local executor); seed 0 was
    started before and killed before its first saved state, so it starts afresh."""
    tmp = tmp_path_factory.mktemp("local")
    sweep, out = _sweep(tmp / "sweep.yaml", cache_dir), tmp / "out"
    _runs(out)[0].mkdir(parents=True)
    (_runs(out)[0] / "config.yaml").write_text("partial: true\n")
    assert cluster_sweep(sweep, out, launcher="slurm", wait=True, cluster="local") == 0
    return sweep, out


def test_local_job_array_trains_and_collects(local_sweep, capsys):
    sweep, out = local_sweep
    for run in _runs(out):
        assert (run / "summary.json").is_file()
    assert "partial" not in (_runs(out)[0] / "config.yaml").read_text()
    assert "| default | hybrid | 2 |" in (out / "results.md").read_text()
    ledger = json.loads((out / "slurm" / "jobs.json").read_text())
    assert set(ledger) == {str(r) for r in _runs(out)} and {e["cluster"] for e in ledger.values()} == {"local"}
    for entry in ledger.values():
        assert (out / "slurm" / f"{entry['job_id']}_0_log.err").is_file()

    capsys.readouterr()
    assert cluster_sweep(sweep, out, launcher="slurm", wait=True, cluster="local") == 0
    printed = capsys.readouterr().out
    assert printed.count("done earlier, skipped") == 2 and "nothing to submit" in printed
    (out / "results.md").unlink()
    assert main(["sweep", str(sweep), "--out", str(out), "--collect"]) == 0
    assert "| default | hybrid | 2 |" in (out / "results.md").read_text()


@pytest.mark.slow
def test_local_job_resumes_an_interrupted_run(local_sweep, capsys):
    """A run whose job ended after its last saved state (summary not yet written) is resumed."""
    sweep, out = local_sweep
    run = _runs(out)[1]
    first = json.loads((run / "summary.json").read_text())
    (run / "summary.json").unlink()
    capsys.readouterr()
    assert cluster_sweep(sweep, out, launcher="slurm", wait=True, cluster="local") == 0
    assert "submitted 1 run(s)" in capsys.readouterr().out
    assert json.loads((run / "summary.json").read_text())["test"] == first["test"]


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """``sbatch`` that records the script and answers job 4242; ``sacct`` that reports PENDING;
    ``srun`` (submitit only checks that it exists)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncat \"$1\" >> {tmp_path}/sbatch.log\necho x >> {tmp_path}/calls\n"
                                    "echo 'Submitted batch job 4242'\n")
    (bin_dir / "sacct").write_text("#!/bin/sh\nprintf 'JobID|State|NodeList\\n4242_0|PENDING|\\n4242_1|PENDING|\\n'\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "sacct", "srun"):
        (bin_dir / tool).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def test_slurm_array_script_and_no_double_submission(fake_slurm, tmp_path, cache_dir, capsys):
    slurm = ("{partition: gpu, gpus_per_run: 2, time_limit: '1-02:30:00', array_parallelism: 1, cpus_per_run: 8, "
             "mem_gb: 32, account: emo, setup: ['source /opt/venv/bin/activate'], additional: {constraint: a100}}")
    sweep, out = _sweep(tmp_path / "sweep.yaml", cache_dir, slurm), tmp_path / "out"
    assert main(["sweep", str(sweep), "--out", str(out), "--launcher", "slurm"]) == 0
    assert "submitted 2 run(s) as job array 4242" in capsys.readouterr().out
    script = (fake_slurm / "sbatch.log").read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --array=0-1%1", "#SBATCH --time=1590", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=4", "#SBATCH --mem=32GB",
                 "#SBATCH --account=emo", "#SBATCH --constraint=a100", "source /opt/venv/bin/activate"):
        assert line in script, line
    ledger = json.loads((out / "slurm" / "jobs.json").read_text())
    assert sorted(e["job_id"] for e in ledger.values()) == ["4242_0", "4242_1"]

    assert main(["sweep", str(sweep), "--out", str(out), "--launcher", "slurm"]) == 0
    assert capsys.readouterr().out.count("still queued or running as job 4242_") == 2
    assert (fake_slurm / "calls").read_text().count("x") == 1  # sbatch was not called again

    assert main(["sweep", str(sweep), "--out", str(out), "--collect"]) == 2
    err = capsys.readouterr().err
    assert "2 of 2 runs have not finished" in err and "job 4242_0 PENDING, log" in err


def test_slurm_errors_name_the_fix(tmp_path, cache_dir, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    sweep = _sweep(tmp_path / "sweep.yaml", cache_dir)
    assert main(["sweep", str(sweep), "--out", str(tmp_path / "out"), "--launcher", "slurm"]) == 2
    assert "sbatch/srun not found; submit from a SLURM login node" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="needs a 'slurm:' key with at least 'partition'"):
        slurm_settings(_sweep(tmp_path / "a.yaml", cache_dir, "{gpus_per_run: 1}"))
    with pytest.raises(ConfigError, match=r"slurm.time_limit: 'soon' is not a time limit"):
        slurm_settings(_sweep(tmp_path / "b.yaml", cache_dir, "{partition: gpu, time_limit: soon}"))
    with pytest.raises(ConfigError, match=r"unknown slurm keys \['gpus'\]"):
        slurm_settings(_sweep(tmp_path / "c.yaml", cache_dir, "{partition: gpu, gpus: 1}"))
    with pytest.raises(LaunchError, match="--wait applies to --launcher slurm"):
        cluster_sweep(sweep, tmp_path / "out", wait=True)


@pytest.mark.parametrize("value,minutes", [(90, 90), ("45", 45), ("10:30", 11), ("4:00:00", 240),
                                           ("1-00", 1440), ("2-03:15", 3075), ("1-02:30:00", 1590)])
def test_slurm_time_formats(value, minutes):
    assert _minutes(value, "t") == minutes
