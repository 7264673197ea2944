"""Kill a training run (SIGKILL, SIGTERM) at several points, resume it, get the same summary; two
processes on one run directory."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from ..conftest import TINY_CONFIG

# Small and quick: 4 steps per epoch, 3 epochs (one per phase), state every 2 steps.
FAST = ["data.synthetic.per_class=10", "data.batch_size=16", "text.steps=50", "train.checkpoint_every_steps=2",
        "train.phases=[{epochs: 1, train: [stage_adapters, fusion]}, "
        "{epochs: 1, train: [stage_adapters, fusion, nga, prompts, layernorms, classifier]}, "
        "{epochs: 1, train: [stage_adapters, fusion, nga, prompts, layernorms, classifier], consistency: true}]"]

# Each kill point patches one function in the child process so it dies at a chosen moment.
KILL_POINTS = {
    "mid-epoch step": ("hclafter.engine.loop", "train_step", 7, "after"),
    "torn checkpoint write": ("hclafter.core.checkpoint", "atomic_write_bytes", 9, "torn"),
    "after epoch state, before metrics": ("hclafter.engine.loop", "save_state", 4, "after"),
    "best-model write": ("hclafter.engine.loop", "save_checkpoint", 2, "before"),
    "final evaluation": ("hclafter.engine.loop", "compute_metrics", 4, "before"),  # the first after 3 validations
}

CHILD = textwrap.dedent("""
    import importlib, os, signal, sys, time
    from pathlib import Path
    module, name, when, mode, sig = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    target = importlib.import_module(module)
    original = getattr(target, name)
    calls = [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        if calls[0] == when:
            if mode == "torn":  # write half of the file's bytes to a temporary file, then die
                path, data = Path(args[0]), args[1]
                path.parent.mkdir(parents=True, exist_ok=True)
                (path.parent / f".{path.name}.torn.tmp").write_bytes(data[: len(data) // 2])
                os.kill(os.getpid(), sig)
            if mode == "before":
                os.kill(os.getpid(), sig)
            if mode == "pause":  # say so, then wait to be killed
                Path(os.environ["HCLAFTER_TEST_PAUSED"]).touch()
                time.sleep(600)
            result = original(*args, **kwargs)
            os.kill(os.getpid(), sig)
            return result
        return original(*args, **kwargs)

    setattr(target, name, patched)
    from hclafter.apps.cli import main
    sys.exit(main(sys.argv[6:]))
""")


def hclafter(*argv: str, kill=None, sig: int = 9) -> subprocess.CompletedProcess:
    if kill is None:
        cmd = [sys.executable, "-m", "hclafter", *argv]
    else:
        module, name, when, mode = kill
        cmd = [sys.executable, "-c", CHILD, module, name, str(when), mode, str(sig), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def train_args(out, cache_dir, figures=False):  # figures: most of a tiny run's time, tested where they matter
    return ["train", "-c", str(TINY_CONFIG), "--out", str(out), "--quiet", *([] if figures else ["--no-figures"]),
            f"cache_dir={cache_dir}", *FAST]


def records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in lines]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("reference")
    done = hclafter(*train_args(out, cache_dir))
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_resume_gives_the_uninterrupted_summary(point, reference, tmp_path, cache_dir):
    out = tmp_path / "run"
    killed = hclafter(*train_args(out, cache_dir), kill=KILL_POINTS[point])
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "summary.json").exists()
    resumed = hclafter("train", "--out", str(out), "--resume", "--quiet", "--no-figures")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text()) == json.loads((reference / "summary.json").read_text())
    assert records(out) == records(reference)
    assert not list(out.rglob("*.tmp"))  # torn temporary files are never left in place of real ones


def test_sigterm_saves_state_exits_cleanly_and_resumes(reference, tmp_path, cache_dir):
    out = tmp_path / "run"
    stopped = hclafter(*train_args(out, cache_dir), kill=("hclafter.engine.loop", "train_step", 6, "after"), sig=15)
    assert stopped.returncode == 128 + 15
    assert f"state saved. Continue with: hclafter train --out {out} --resume" in stopped.stderr
    state = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert state["folder"] == "step-00000006"  # saved right at the interruption, not at the last periodic save
    resumed = hclafter("train", "--out", str(out), "--resume", "--quiet", "--no-figures")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {out} at epoch" in resumed.stdout
    assert json.loads((out / "summary.json").read_text()) == json.loads((reference / "summary.json").read_text())


def test_resume_refuses_a_different_config_and_new_runs_refuse_an_existing_one(reference, tmp_path, cache_dir):
    again = hclafter(*train_args(reference, cache_dir))
    assert again.returncode == 2 and "already holds a finished run; choose another --out" in again.stderr
    other = hclafter(*train_args(reference, cache_dir), "--resume", "model.prompt_tokens=3")
    assert other.returncode == 2 and "model.prompt_tokens" in other.stderr
    nothing = hclafter("train", "--out", str(tmp_path / "empty"), "--resume")
    assert nothing.returncode == 2 and "nothing to resume" in nothing.stderr


def test_a_kill_before_the_summary_leaves_a_run_that_resume_finishes(reference, tmp_path, cache_dir):
    """summary.json, the mark of a finished run, is written last: predictions and plots come before it."""
    out = tmp_path / "run"
    killed = hclafter(*train_args(out, cache_dir, figures=True),
                      kill=("hclafter.reporting.report", "write_run_figures", 1, "after"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / "predictions.csv").is_file()
    assert all((out / "plots" / name).is_file() for name in ("curves.png", "confusion.png", "stage_weights.png"))
    assert not (out / "summary.json").exists()
    resumed = hclafter("train", "--out", str(out), "--resume", "--quiet", "--no-figures")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text()) == json.loads((reference / "summary.json").read_text())
    assert (out / "predictions.csv").read_bytes() == (reference / "predictions.csv").read_bytes()


def test_a_second_process_on_a_run_directory_fails_at_once_and_a_dead_holders_lock_is_taken_over(
        reference, tmp_path, cache_dir):
    out, paused = tmp_path / "run", tmp_path / "paused"
    with open(tmp_path / "holder.log", "w") as log:  # pauses in its third step (a state is saved at step 2)
        holder = subprocess.Popen([sys.executable, "-c", CHILD, "hclafter.engine.loop", "train_step", "3", "pause", "9",
                                   *train_args(out, cache_dir)], stdout=log, stderr=log,
                                  env={**os.environ, "HCLAFTER_TEST_PAUSED": str(paused)})
    try:
        deadline = time.monotonic() + 300
        while not paused.exists():
            assert holder.poll() is None and time.monotonic() < deadline, (tmp_path / "holder.log").read_text()
            time.sleep(0.2)
        for argv in (train_args(out, cache_dir), ["train", "--out", str(out), "--resume", "--quiet", "--no-figures"]):
            second = hclafter(*argv)
            assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
            assert f"{out} is in use by PID {holder.pid} on " in second.stderr
    finally:
        holder.kill()
        holder.wait()
    # The kill left the lock file and its note: the next process takes the lock over and resumes.
    resumed = hclafter("train", "--out", str(out), "--resume", "--quiet", "--no-figures")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text()) == json.loads((reference / "summary.json").read_text())
