"""The step budget (train.steps → phases → rounds and schedule) and the convergence verdict, each
against numbers worked out by hand; the † of every table; the CLI's verdict and warning."""
import json

import pytest
import torch
from safetensors.torch import load_file

from hclafter.apps.cli import main
from hclafter.apps.demo import format_table
from hclafter.apps.runs import convergence_warning
from hclafter.core.config import ConfigError, PhaseConfig, TrainConfig, load_config, phase_steps
from hclafter.core.metrics import CONVERGED, STILL_IMPROVING, convergence
from hclafter.engine.optim import schedule_length, training_rounds, warmup_cosine
from hclafter.reporting.evidence import results_cells, table_cells, table_notes

from .conftest import TINY_CONFIG

THREE_PHASES = TrainConfig().phases  # the seed's 3:3:2


# --- budget → phases → rounds ------------------------------------------------------------------


def test_a_step_budget_splits_among_the_phases_in_proportion_to_their_epochs():
    # Phase ends at round(S·3/8), round(S·6/8), S; halves round up.
    assert phase_steps(TrainConfig(steps=80), 999) == [30, 30, 20]
    assert phase_steps(TrainConfig(steps=6), 999) == [2, 3, 1]  # ends 2.25 → 2, 4.5 → 5, 6
    assert phase_steps(TrainConfig(steps=4), 999) == [2, 1, 1]  # ends 1.5 → 2, 3, 4
    assert phase_steps(TrainConfig(steps=7, phases=[PhaseConfig(1, ["fusion"])]), 999) == [7]
    # Without train.steps, epochs × steps per epoch; and a budget of that many steps ends the phases alike.
    assert phase_steps(TrainConfig(), 13) == [39, 39, 26] == phase_steps(TrainConfig(steps=8 * 13), 13)


def test_a_budget_that_leaves_a_phase_without_steps_is_a_config_error_naming_the_numbers():
    with pytest.raises(ConfigError, match=r"^train.steps=2 gives phase 3 no steps: the phases' epochs 3:3:2 split it "
                                          r"into \[1, 1, 0\]; give at least 3 steps$"):
        load_config([], ["train.steps=2"])
    with pytest.raises(ConfigError, match=r"train.steps must be in \[1, 10000000\], got 0"):
        load_config([], ["train.steps=0"])
    # 1:9 needs 5 steps: the first phase ends at 0.4 of 4 steps (rounds to 0), at 0.5 of 5 (rounds up to 1).
    with pytest.raises(ConfigError, match=r"split it into \[0, 4\]; give at least 5 steps"):
        load_config([], ["train.steps=4", "train.phases=[{epochs: 1, train: [fusion]}, {epochs: 9, train: [fusion]}]"])
    assert load_config([], ["train.steps=3"]).train.steps == 3


def test_rounds_of_an_epoch_budget_are_its_epochs():
    rounds = training_rounds(TrainConfig(), 5)
    assert [(r.phase_no, r.epoch, r.first, r.steps, r.end) for r in rounds] == \
        [(p, e, 0, 5, 5 * (e + 1)) for p, e in zip([1, 1, 1, 2, 2, 2, 3, 3], range(8))]


def test_rounds_of_a_step_budget_cut_passes_at_phase_ends_and_every_tenth_and_read_each_batch_once():
    # 100 steps, 30 batches per pass: phases end at 38, 75, 100; validations every 10 steps and at
    # the end of every pass (30, 60, 90).
    rounds = training_rounds(TrainConfig(steps=100), 30)
    assert [r.end for r in rounds] == [10, 20, 30, 38, 40, 50, 60, 70, 75, 80, 90, 100]
    assert [r.phase_no for r in rounds] == [1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3]
    assert [(r.epoch, r.first) for r in rounds[3:5]] == [(1, 0), (1, 8)]  # pass 2 continues after the phase end
    for epoch in range(4):
        spans = [(r.first, r.first + r.steps) for r in rounds if r.epoch == epoch]
        assert [a for a, _ in spans] == [0, *(b for _, b in spans[:-1])]  # contiguous from batch 0
        assert spans[-1][1] == (30 if epoch < 3 else 10)
    # A budget below one pass still validates 10 times.
    assert len(training_rounds(TrainConfig(steps=20, phases=[PhaseConfig(1, ["fusion"])]), 1000)) == 10


def test_warmup_and_cosine_follow_the_steps_and_the_same_budget_gives_the_same_learning_rates():
    assert schedule_length(TrainConfig(), 10, 1) == (5, 80)  # 0.5 epochs of warm-up, 8 epochs
    assert schedule_length(TrainConfig(steps=80), 10, 1) == (5, 80)
    assert schedule_length(TrainConfig(steps=80), 10, 2) == (5, 160)  # accelerate steps it once per process
    assert schedule_length(TrainConfig(steps=3, warmup_epochs=2.0), 10, 1) == (3, 3)  # at most the budget

    def rates(length):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = warmup_cosine(opt, *length)
        out = []
        for _ in range(length[1]):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            scheduler.step()
        return out

    assert rates(schedule_length(TrainConfig(), 10, 1)) == rates(schedule_length(TrainConfig(steps=80), 10, 1))
    r = rates((2, 6))
    assert r[:2] == [0.5, 1.0] and r[-1] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(3 / 4 * torch.pi)).item()))


# --- the convergence verdict -------------------------------------------------------------------


@pytest.mark.parametrize("curve, verdict, rise", [
    # 100 steps: the last 20 % are the points after step 80.
    ([(20, 0.50), (40, 0.60), (60, 0.70), (80, 0.700), (100, 0.706)], STILL_IMPROVING, 0.006),  # +0.6 points
    ([(20, 0.50), (40, 0.60), (60, 0.70), (80, 0.700), (100, 0.705)], CONVERGED, 0.005),  # +0.5 exactly: not more
    ([(50, 101 / 200), (100, 102 / 200)], CONVERGED, 0.005),  # one image of 200 is 0.5 points
    ([(50, 100 / 200), (100, 102 / 200)], STILL_IMPROVING, 0.01),
    ([(20, 0.50), (60, 0.80), (90, 0.70), (100, 0.75)], CONVERGED, -0.05),  # the best came before
    ([(80, 0.40), (100, 0.90)], STILL_IMPROVING, 0.5),  # a point at 80 % belongs to "before"
    ([(100, 0.90)], STILL_IMPROVING, None),  # nothing before the last 20 %: no plateau shown
])
def test_verdict_on_curves_worked_out_by_hand(curve, verdict, rise):
    c = convergence(curve, 100)
    assert c["verdict"] == verdict
    assert c["rise"] == (None if rise is None else pytest.approx(rise))
    assert c["validations"] == len(curve) and c["last_steps_after"] == 80.0


def test_a_curve_without_a_point_in_the_last_fifth_is_refused():
    with pytest.raises(ValueError, match="no validation after step 80 of 100"):
        convergence([(50, 0.5), (80, 0.6)], 100)


# --- tables and the CLI ------------------------------------------------------------------------


def _row(name, still_improving, seeds=3):
    return {"key": name, "method": name, "seeds": seeds, "test_images": [100], "accuracy": (0.7, 0.01),
            "macro_f1": (0.6, 0.01), "kl": (0.5, 0.0), "kl_calibrated": (0.4, 0.0), "ece": (0.1, 0.0),
            "ece_calibrated": (0.05, 0.0), "trained": 10, "added": 10, "added_vs_reference": None,
            "still_improving": still_improving,
            "comparison": None if name == "H" else {"difference": 0.1, "ci": [0.0, 0.2], "p_value": 0.5,
                                                    "verdict": "not distinguishable"}}


def test_every_table_marks_unconverged_rows_with_a_dagger_and_a_footnote():
    rows = [_row("H", 2), _row("B", 0)]
    _, cells = table_cells(rows, "H")
    assert [c[0] for c in cells] == ["H †", "B"]
    notes = table_notes(rows, False)
    assert "† Still improving when training ended: H (2 of 3 seeds)." in notes and "B (" not in notes
    terminal = format_table(rows, 0.125)
    assert "H †" in terminal and "† Still improving when training ended: H (2 of 3 seeds)" in " ".join(terminal.split())
    assert "†" not in table_notes([_row("H", 0)], False) + format_table([_row("H", 0)], 0.125)
    sweep_row = {"dataset": "d", "name": "B", "variant": "", "seeds": 3, "trained_params": 1, "added_over_reference": None,
                 "gflops_per_image": 1.0, "latency_ms_per_image": 1.0, "still_improving": 1,
                 **{f"{k}_{s}": 0.5 for k in ("accuracy", "macro_f1", "polarity_accuracy", "kl", "cosine")
                    for s in ("mean", "std")}}
    assert results_cells([sweep_row])[1][0][1] == "B †"


def test_the_warning_names_the_numbers_and_is_silent_for_converged_runs():
    summary = {"steps": 50, "convergence": convergence([(10, 0.5), (40, 0.6), (50, 0.65)], 50)}
    assert convergence_warning(summary) == (
        "warning: this run is still improving: best validation accuracy 60.0 % → 65.0 % in the last 20 % of its 50 "
        "steps; train longer (e.g. train.steps=100) before comparing it")
    assert convergence_warning({"steps": 50, "convergence": convergence([(40, 0.6), (50, 0.6)], 50)}) is None
    assert convergence_warning({"epochs": 0}) is None  # a frozen baseline
    assert "cannot show a plateau" in convergence_warning({"steps": 5, "convergence": convergence([(5, 0.6)], 5)})


def test_train_with_a_step_budget_writes_its_curve_and_verdict(tmp_path, cache_dir, capsys):
    out = tmp_path / "run"
    assert main(["train", "--no-figures", "-c", str(TINY_CONFIG), "--out", str(out), "--quiet", f"cache_dir={cache_dir}",
                 "data.synthetic.per_class=10", "text.steps=20", "train.steps=6"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Batches of 32 make 2 steps per pass; the tiny config's phases are 2:2:2; 6 steps validate after
    # each (a tenth of the budget, rounded up).
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and [r["phase"] for r in records] == [1, 1, 2, 2, 3, 3]
    assert [r["epoch"] for r in records] == [0.5, 1, 1.5, 2, 2.5, 3] and summary["epochs"] == 3
    assert summary["steps"] == 6
    assert summary["convergence"] == convergence([(r["step"], r["val_accuracy"]) for r in records], 6)
    warned = "warning: this run is still improving" in capsys.readouterr().err
    assert warned == (summary["convergence"]["verdict"] == STILL_IMPROVING)


def test_a_step_budget_of_the_epochs_length_trains_the_same_weights(tmp_path, cache_dir):
    """The same number of steps as epochs or as train.steps: the same phases, learning rates and
    batches, so the same final weights bit for bit; only the validation points differ."""
    common = ["--quiet", f"cache_dir={cache_dir}", "data.synthetic.per_class=10", "text.steps=20",
              "train.phases=[{epochs: 2, train: [stage_adapters, fusion]}, {epochs: 1, train: [stage_adapters, "
              "fusion, nga, prompts, layernorms, classifier], consistency: true}]"]
    assert main(["train", "--no-figures", "-c", str(TINY_CONFIG), "--out", str(tmp_path / "epochs"), *common]) == 0
    assert main(["train", "--no-figures", "-c", str(TINY_CONFIG), "--out", str(tmp_path / "steps"), *common, "train.steps=6"]) == 0
    epochs, steps = (load_file(tmp_path / name / "last.safetensors") for name in ("epochs", "steps"))
    assert epochs.keys() == steps.keys() and all(torch.equal(epochs[k], steps[k]) for k in epochs)
    by_step = {name: {json.loads(line)["step"]: json.loads(line) for line in
                      (tmp_path / name / "metrics.jsonl").read_text().splitlines()} for name in ("epochs", "steps")}
    assert sorted(by_step["epochs"]) == [2, 4, 6] and sorted(by_step["steps"]) == [1, 2, 3, 4, 5, 6]
    for step in (2, 4, 6):  # the same weights at every epoch end: the same validation
        assert by_step["epochs"][step]["val_accuracy"] == by_step["steps"][step]["val_accuracy"]
        assert by_step["epochs"][step]["val_loss"] == by_step["steps"][step]["val_loss"]
        assert by_step["epochs"][step]["lr"] == by_step["steps"][step]["lr"]
