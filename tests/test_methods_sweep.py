"""Baselines and ablations wired as specified; the sweep runner; the single-run report."""
import dataclasses
import json
import re

import pytest
import yaml

from hclafter.engine import run as run_module
from hclafter.apps.cli import main
from hclafter.core.config import ConfigError, load_config
from hclafter.core.emotions import MIKELS8
from hclafter.model import build_model
from hclafter.engine.run import train_run
from hclafter.apps.sweep import plan
from hclafter.engine.optim import param_groups
from hclafter.models import check_config

from .conftest import ROOT, TINY_CONFIG

METHODS = ROOT / "configs" / "methods"
SHORT = ["data.synthetic.per_class=8", "text.steps=30"]
ONE_EPOCH = "train.phases=[{epochs: 1, train: [prompts, layernorms, classifier]}]"


def method_cfg(name, *overrides):
    return load_config([TINY_CONFIG, METHODS / f"{name}.yaml"], [*SHORT, *overrides])


def test_every_method_of_the_tables_has_a_config():
    names = {p.stem for p in METHODS.glob("*.yaml")}
    assert {"zeroshot", "textonly", "lafter", "lafter_pseudo", "segmented", "cascadeclip", "hybrid", "hybrid_no_nga",
            "hybrid_no_adapters", "hybrid_no_consistency", "hybrid_stages_2", "hybrid_stages_4"} <= names
    smoke = yaml.safe_load((ROOT / "configs" / "sweeps" / "smoke.yaml").read_text())
    assert set(smoke["methods"]) == names and smoke["seeds"] == [0, 1]
    assert set(yaml.safe_load((ROOT / "configs" / "sweeps" / "paper.yaml").read_text())["methods"]) == names


def test_ablations_change_exactly_their_component(tiny_backbone):
    hybrid = method_cfg("hybrid")
    for name, changed in (("hybrid_no_nga", {"aggregation": "mean"}), ("hybrid_no_adapters", {"stage_adapters": False}),
                          ("hybrid_stages_2", {"stages": [[7, 8, 9], [10, 11, 12]]})):
        assert dataclasses.replace(hybrid.model, **changed) == method_cfg(name).model
    assert method_cfg("hybrid_no_consistency").train.consistency_weight == 0.0
    no_nga = build_model(tiny_backbone, 8, method_cfg("hybrid_no_nga").model)
    assert not param_groups(no_nga)["nga"] and not any("sigma" in n for n, _ in no_nga.named_parameters())
    assert no_nga.nga_weights() == [[pytest.approx(1 / 3)] * 3, [0.5, 0.5], [pytest.approx(1 / 3)] * 3]
    lafter = build_model(tiny_backbone, 8, method_cfg("lafter").model)
    assert lafter.extraction_layers == [12] and lafter.adapters is None


def test_baseline_models_are_built_from_their_configs(tiny_backbone, cache_dir):
    import torch

    segmented = build_model(tiny_backbone, 8, method_cfg("segmented").model)
    assert len(segmented.stages) == 4 and param_groups(segmented)["projections"]
    cfg = method_cfg("cascadeclip")
    cascade = run_module.build_run_model(tiny_backbone, MIKELS8, cfg, torch.zeros(8, 32))
    groups = param_groups(cascade)
    assert groups["decoders"] and groups["projections"] and not groups["classifier"]
    assert not hasattr(cascade, "classifier")


def _garbage_train_labels(monkeypatch):
    original = run_module.load_splits

    def load(cfg, seed, cache):
        data = original(cfg, seed, cache)
        data.splits["train"] = [dataclasses.replace(s, label=(s.label * 5 + 3) % 8) for s in data["train"]]
        return data

    monkeypatch.setattr(run_module, "load_splits", load)


def test_lafter_pseudo_never_reads_training_labels(tmp_path, cache_dir, monkeypatch):
    cfg = lambda name: method_cfg(name, ONE_EPOCH, f"cache_dir={cache_dir}")
    clean = train_run(cfg("lafter_pseudo"), tmp_path / "clean", progress=False)
    supervised = train_run(cfg("lafter"), tmp_path / "sup", progress=False)
    _garbage_train_labels(monkeypatch)
    garbage = train_run(cfg("lafter_pseudo"), tmp_path / "garbage", progress=False)
    assert garbage["test"] == clean["test"] and garbage["val"] == clean["val"]
    records = lambda d: [{k: v for k, v in json.loads(x).items() if k != "time_s"}
                         for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    assert records("garbage") == records("clean")
    # the same garbage does change a supervised run, so the comparison above can fail
    assert train_run(cfg("lafter"), tmp_path / "sup-garbage", progress=False)["test"] != supervised["test"]


def test_a_cold_cache_gives_the_same_run_as_a_warm_one(tmp_path):
    """Building the caches on first use draws from the global generator (loader seeds); training
    must not see it (it did: the label-free run's LDL metrics moved in the 5th digit)."""
    cfg = method_cfg("lafter_pseudo", ONE_EPOCH, f"cache_dir={tmp_path / 'cache'}")
    cold = train_run(cfg, tmp_path / "cold", progress=False)
    assert (tmp_path / "cache" / "images").is_dir()
    warm = train_run(cfg, tmp_path / "warm", progress=False)
    assert warm["test"] == cold["test"] and warm["val"] == cold["val"]


def _tiny_sweep(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "base": [str(TINY_CONFIG)],
        "methods": {"zeroshot": str(METHODS / "zeroshot.yaml"), "lafter": str(METHODS / "lafter.yaml"),
                    "hybrid": str(METHODS / "hybrid.yaml")},
        "overrides": [*SHORT, "train.phases=[{epochs: 1, train: [prompts, classifier, fusion]}]"],
        "headline": "hybrid", "reference": "lafter", "pairs": [["lafter", "hybrid"]], "seeds": [0, 1]},
        sort_keys=False))
    return sweep


def test_sweep_tables_and_restart_after_a_kill(tmp_path, cache_dir, monkeypatch):
    sweep, out = _tiny_sweep(tmp_path), tmp_path / "out"
    calls = []
    original = run_module.train_run

    def dies_on_fourth(cfg, out_dir, progress=True, resume=False, **kwargs):
        calls.append((out_dir.parent.parent.name, resume))
        if len(calls) == 4:
            raise KeyboardInterrupt  # the sweep is killed during its fourth run
        return original(cfg, out_dir, progress=progress, resume=resume, **kwargs)

    monkeypatch.setattr(run_module, "train_run", dies_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        main(["sweep", str(sweep), "--out", str(out), "--quiet", f"cache_dir={cache_dir}"])
    calls.clear()
    monkeypatch.setattr(run_module, "train_run", original)
    counted = []
    monkeypatch.setattr(run_module, "train_run", lambda *a, **k: counted.append(a[1]) or original(*a, **k))
    assert main(["sweep", str(sweep), "--out", str(out), "--quiet", f"cache_dir={cache_dir}"]) == 0
    assert [p.parent.parent.name for p in counted] == ["lafter", "hybrid", "hybrid"]  # only the missing runs
    table = (out / "results.md").read_text()
    for method in ("zero-shot CLIP", "LaFTer-sup (last block)", "HybridCascade-LaFTer"):
        assert re.search(rf"\| default \| {re.escape(method)}( †)? \| 2 \|", table), method  # †: still improving
    assert "| default | zero-shot CLIP | 2 |" in table  # no training, no verdict, no †
    rows = {r["method"]: r for r in __import__("csv").DictReader(open(out / "results.csv"))}
    assert rows["hybrid"]["seeds"] == "2" and float(rows["hybrid"]["gflops_per_image"]) > 0
    assert int(rows["hybrid"]["added_over_reference"]) > 0 and rows["lafter"]["added_over_reference"] == "0"
    assert rows["zeroshot"]["added_over_reference"] == ""  # frozen: "–" in the table, never a negative number
    # The evidence table: the headline against each row, with CI, McNemar p and a verdict in words.
    evidence = table[table.index("## default"):]
    assert "Δ accuracy vs HybridCascade-LaFTer" in evidence and "(headline)" in evidence
    assert evidence.count("not distinguishable at 95 %") + evidence.count("better") + evidence.count("worse") >= 2
    assert "carry no meaning" in evidence  # random-initialised tiny backbone
    # Raw KL as the runs evaluated it (from the logits: zero-shot's peaked probabilities round to 0 in the file).
    zeroshot_row = next(line for line in evidence.splitlines() if line.startswith("| zero-shot CLIP |"))
    kls = [json.loads((out / "runs" / "default" / "zeroshot" / "default" / f"seed{k}" / "summary.json").read_text())
           ["test"]["ldl"]["kl"] for k in (0, 1)]
    assert float(zeroshot_row.split(" | ")[8].split(" ±")[0]) == pytest.approx(sum(kls) / 2, abs=6e-4)
    # One family for Holm: every row against the headline and the pair (3 comparisons), stated with the tables.
    assert "| McNemar p | Holm p | verdict |" in evidence and "Holm's step-down over the 3 comparison(s)" in evidence
    assert "No method was tuned" in evidence
    # A pair compares its two methods the other way round: the same difference, negated.
    lafter_row = next(line for line in evidence.splitlines() if re.match(r"\| LaFTer-sup \(last block\)( †)? \|", line))
    delta = float(lafter_row.split(" | ")[4].split(" [")[0])
    pair = next(line for line in table[table.index("## Pairwise comparisons"):].splitlines()
                if re.match(r"\| default \| LaFTer-sup \(last block\)( †)? \| HybridCascade-LaFTer( †)? \|", line))
    assert float(pair.split(" | ")[5].split(" [")[0]) == pytest.approx(-delta, abs=0.051)
    assert float(rows["lafter"]["accuracy_std"]) >= 0 and "±" in table
    for plot in ("accuracy.png", "train_loss.png", "learned_weights.png"):
        assert (out / "plots" / plot).stat().st_size > 0
        assert (out / "plots" / plot).with_suffix(".svg").stat().st_size > 0
    page = (out / "report.html").read_text()  # the sweep's HTML report links every run's own report
    assert page.count("data:image/svg+xml;base64,") == 3 and "<h2>Runs</h2>" in page
    assert "<h2>Comparisons</h2>" in page and "Δ A − B (95 % CI)" in page  # the evidence tables, as in results.md
    assert f"{int(rows['hybrid']['added_over_reference']):+,d}" in page and "added vs LaFTer-sup (last block)" in page
    assert page.count('report.html">report</a>') == 6
    assert (out / "runs" / "default" / "zeroshot" / "default" / "seed0" / "report.html").is_file()
    # `hclafter report` on the sweep folder writes the same tables again, comparisons included.
    (out / "results.md").unlink()
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "results.md").read_text() == table
    again = (out / "report.html").read_text()
    assert "<h2>Comparisons</h2>" in again and "Δ A − B (95 % CI)" in again and "added vs LaFTer-sup" in again


def test_sweep_pairs_must_name_two_of_its_methods(tmp_path):
    sweep = _tiny_sweep(tmp_path)
    spec = yaml.safe_load(sweep.read_text())
    for bad in (["lafter", "nope"], ["lafter"], "lafter"):
        sweep.write_text(yaml.safe_dump({**spec, "pairs": [bad]}))
        with pytest.raises(ConfigError, match=r"pairs: .* is not a pair \[A, B\] of the methods"):
            plan(sweep, tmp_path / "out")


def test_report_is_a_self_contained_page(tmp_path, cache_dir):
    out = tmp_path / "run"
    train_run(method_cfg("hybrid", ONE_EPOCH, f"cache_dir={cache_dir}"), out, progress=False)
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert f"{100 * summary['test']['accuracy']:.2f}" in page
    assert page.count("data:image/svg+xml;base64,") >= 5 and "stage 3 (blocks 10–12)" in page


def test_a_phase_that_trains_nothing_of_the_method_is_rejected():
    """LaFTer-sup has no adapters, and one stage of one layer: its β and σ never get a gradient."""
    lafter = ROOT / "configs" / "methods" / "lafter.yaml"
    with pytest.raises(ConfigError, match=r"train\.phases\[0\]\.train = \['stage_adapters', 'fusion', 'nga'\]: no "
                                          r"parameter .* train one of \['classifier', 'layernorms', 'prompts'\]"):
        check_config(load_config([TINY_CONFIG, lafter],
                                 ["train.phases=[{epochs: 1, train: [stage_adapters, fusion, nga]}]"]))
    with pytest.raises(ConfigError, match=r"train\.phases\[1\]"):
        check_config(load_config([TINY_CONFIG, lafter],
                                 ["train.phases=[{epochs: 1, train: [prompts]}, {epochs: 1, train: [fusion]}]"]))
    adapter = load_config([TINY_CONFIG, lafter], ["model.stage_adapters=true",
                                                  "train.phases=[{epochs: 1, train: [stage_adapters]}]"])
    check_config(adapter)
    assert adapter.train.phases[0].train == ["stage_adapters"]
    check_config(load_config([TINY_CONFIG, lafter], ["mode=textonly", "train.phases=[{epochs: 1, train: [fusion]}]"]))


def test_a_parallel_sweep_gives_the_runs_of_a_sequential_one(tmp_path, cache_dir):
    """--workers 2 runs each run whole in one of two processes: the same files as one process with
    the same torch thread count (recorded in run.json), and a second call skips every finished run."""
    import torch

    from hclafter.apps.sweep import execute, run_status

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "base": [str(TINY_CONFIG)], "methods": {"textonly": str(METHODS / "textonly.yaml"),
                                                "hybrid": str(METHODS / "hybrid.yaml")},
        "overrides": [*SHORT, ONE_EPOCH, f"cache_dir={cache_dir}"], "seeds": [0]}))
    parallel = plan(sweep, tmp_path / "parallel").runs
    execute(parallel, progress=False, workers=2, figures=False)
    threads = {json.loads((r.out / "run.json").read_text())["hardware"]["torch_threads"] for r in parallel}
    assert len(threads) == 1
    sequential = plan(sweep, tmp_path / "sequential").runs
    before = torch.get_num_threads()
    torch.set_num_threads(threads.pop())
    try:
        execute(sequential, progress=False, figures=False)
    finally:
        torch.set_num_threads(before)
    for p, s in zip(parallel, sequential):
        for name in ("predictions.csv", "predictions_val.csv"):
            assert (p.out / name).read_bytes() == (s.out / name).read_bytes(), (p.method, name)
        assert json.loads((p.out / "summary.json").read_text())["test"] == \
            json.loads((s.out / "summary.json").read_text())["test"]
    execute(parallel, progress=False, workers=2, figures=False)  # nothing left to do
    assert all(run_status(r) == "done" for r in parallel)
    with pytest.raises(ConfigError, match="--workers 0"):
        execute(parallel, workers=0)


def test_parallel_runs_start_with_the_largest_step_budget(tmp_path):
    """Processes take the runs longest first, so that no long run starts while the others run out of work;
    runs without a step budget keep their order after those with one."""
    from hclafter.apps.sweep import longest_first

    for steps in (10, 40):
        (tmp_path / f"steps{steps}.yaml").write_text(f"train: {{steps: {steps}}}\n")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "base": [str(TINY_CONFIG)], "seeds": [0, 1],
        "methods": {"textonly": str(METHODS / "textonly.yaml"),
                    "lafter": [str(METHODS / "lafter.yaml"), str(tmp_path / "steps40.yaml")],
                    "hybrid": [str(METHODS / "hybrid.yaml"), str(tmp_path / "steps10.yaml")]}}))
    runs = plan(sweep, tmp_path / "out").runs
    planned = [(r.method, r.seed) for r in runs]
    expected = ([m for m in planned if m[0] == "lafter"] + [m for m in planned if m[0] == "hybrid"]
                + [m for m in planned if m[0] == "textonly"])
    assert [(r.method, r.seed) for r in longest_first(runs)] == expected
    assert planned != expected  # the plan itself starts elsewhere
