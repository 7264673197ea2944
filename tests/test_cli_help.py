"""The command line explains itself: help on every argument, a version, examples, flag-named errors."""
import argparse

import pytest

from hclafter import __version__
from hclafter.apps.bench import cmd_bench
from hclafter.apps.cli import build_parser, main
from hclafter.apps.runs import inapplicable_options
from hclafter.core.config import load_config

from .conftest import TINY_CONFIG


def walk(parser: argparse.ArgumentParser, path: str = "hclafter"):
    """(command path, action) for every argument of every (sub-)command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, f"{path} {name}")
        else:
            yield path, action


def test_every_argument_of_every_command_has_help():
    missing = [f"{path} {action.option_strings or action.dest}" for path, action in walk(build_parser())
               if not action.help]
    assert missing == []


def test_version_bare_command_and_top_level_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"hclafter {__version__}"
    assert main([]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: hclafter") and "examples:" in text and "hclafter predict" in text
    assert "``" not in text and ":mod:" not in text


def test_zeroshot_warns_about_options_that_do_not_apply(capsys):
    cfg = load_config([TINY_CONFIG], ["mode=zeroshot", "text.templates=['a photo of {}.']"])
    ignored = inapplicable_options(cfg)
    assert "model.prompt_tokens" in ignored and "train.phases" in ignored and "text.steps" in ignored
    assert not any(k.startswith(("data.", "backbone.", "text.templates")) for k in ignored)
    assert "text.steps" not in inapplicable_options(load_config([TINY_CONFIG], ["mode=textonly"]))
    assert inapplicable_options(load_config([TINY_CONFIG])) == []


def test_device_errors_name_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["eval", str(tmp_path), "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), "x.png", "--precision", "fp16"]) == 2
    assert "--precision fp16 needs a CUDA device" in capsys.readouterr().err


def test_bench_text_output_keeps_keys_and_values_apart(monkeypatch, capsys):
    monkeypatch.setattr("hclafter.apps.bench.run_bench", lambda *a, **k: {"eval_ms_ratio_hybrid_vs_lafter_from_parts": 1.0876,
                                                                     "batch": 32})
    args = build_parser().parse_args(["bench"])
    assert cmd_bench(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["eval_ms_ratio_hybrid_vs_lafter_from_parts", "1.0876"]


def test_fp16_on_a_cpu_is_refused(tmp_path, capsys):
    assert main(["train", "-c", str(TINY_CONFIG), "--out", str(tmp_path / "run"), "device=cpu", "precision=fp16"]) == 2
    assert "fp16 needs a CUDA device" in capsys.readouterr().err
