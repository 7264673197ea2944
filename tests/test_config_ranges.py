"""Every numeric setting has a documented range checked at load time; overrides name list entries by
index everywhere an override is accepted; every OmegaConf or YAML problem is one line naming the
file or override, the key and the value (issue 24, points 3 and 4)."""
import dataclasses
import re
import typing

import pytest
import yaml

from hclafter.apps.cli import main
from hclafter.apps.sweep import plan
from hclafter.core import config
from hclafter.core.config import RANGES, Config, ConfigError, load_config, range_text, values_at

from .conftest import ROOT, TINY_CONFIG

MICRO = ["data.synthetic.per_class=3", "data.synthetic.image_size=32", "text.steps=1", "train.log_with=[]",
         "train.phases=[{epochs: 2, train: [stage_adapters, fusion]}]"]


def _numeric_keys(cls, prefix=""):
    """The dotted keys of every number in the settings (``*``: each entry of a mapping or list)."""
    for field in dataclasses.fields(cls):
        kind, key = typing.get_type_hints(cls)[field.name], f"{prefix}{field.name}"
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        while typing.get_origin(kind) in (list, dict, typing.Union):
            if typing.get_origin(kind) is not typing.Union:
                key += ".*"
            kind = args[-1]
            args = [a for a in typing.get_args(kind) if a is not type(None)]
        if dataclasses.is_dataclass(kind):
            yield from _numeric_keys(kind, f"{key}.")
        elif kind in (int, float):
            yield key


def test_every_numeric_setting_has_a_range():
    assert sorted(_numeric_keys(Config)) == sorted(RANGES)


def test_the_readme_lists_every_range():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    listed = dict(re.findall(r"`([a-z_.*]+)` \| ([\[(][^|]+[\])]) ", readme))
    assert listed == {key: range_text(*bounds) for key, bounds in RANGES.items()}


def _outside(value, low, low_in, high, high_in):
    """Values just outside a range, as override text, and NaN for floats."""
    out = [str(low - 1 if low_in else low)]
    if high is not None:
        out.append(str(high + 1 if high_in else high))
    return out + (["nan", "inf"] if isinstance(value, float) else [])


def test_every_range_is_checked_at_load_time():
    defaults = load_config([TINY_CONFIG])
    checked = 0
    for pattern, bounds in RANGES.items():
        for key, value in values_at(defaults, pattern):
            for bad in _outside(value if value is not None else 1, *bounds):
                with pytest.raises(ConfigError) as info:
                    load_config([TINY_CONFIG], [f"{key}={bad}"])
                assert re.search(rf"{re.escape(key)} must be (a finite number )?in {re.escape(range_text(*bounds))}, "
                                 rf"got ", str(info.value)), str(info.value)
                checked += 1
    assert checked > 3 * len(RANGES)
    assert load_config([TINY_CONFIG], ["seed=4294967295", "data.synthetic.image_size=4096"]).seed == 2**32 - 1


def test_list_entries_by_index_everywhere_an_override_is_accepted(tmp_path, cache_dir, capsys):
    cfg = load_config([TINY_CONFIG], ["train.phases.0.epochs=1", "model.stages.2.0=9"])
    assert [p.epochs for p in cfg.train.phases] == [1, 2, 2] and cfg.model.stages[2] == [9, 11, 12]
    out = tmp_path / "run"  # the command of the issue, quicker
    assert main(["train", "--no-figures", "-c", str(TINY_CONFIG), "--out", str(out), "--quiet", f"cache_dir={cache_dir}", *MICRO,
                 "train.phases.0.epochs=1"]) == 0
    assert load_config([out / "config.yaml"]).train.phases[0].epochs == 1
    assert main(["train", "--no-figures", "--out", str(out), "--resume", "--quiet", "train.phases.0.epochs=1"]) == 0
    assert main(["train", "--no-figures", "--out", str(out), "--resume", "--quiet", "train.phases.0.epochs=3"]) == 2
    assert "train.phases.0.epochs: 1 → 3" in capsys.readouterr().err
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": [str(TINY_CONFIG)], "methods": {"hybrid": []}, "seeds": [0],
                                     "overrides": ["train.phases.1.epochs=1"],
                                     "grid": {"train.phases.0.epochs": [1, 2]}}))
    runs = plan(sweep, tmp_path / "out", ["train.phases.2.epochs=1"]).runs
    assert [[p.epochs for p in load_config(r.configs, r.overrides).train.phases] for r in runs] == [[1, 1, 1],
                                                                                                   [2, 1, 1]]


@pytest.mark.parametrize("override, message", [
    ("train.phases.7.epochs=1", "override train.phases.7.epochs=1: train.phases has 3 entries, numbered from 0; "
                                "there is no entry 7"),
    ("train.phases.x.epochs=1", "override train.phases.x.epochs=1: Index 'x' (str) is not an int"),
    ("train.phases.0.epochs=abc", "override train.phases.0.epochs=abc: train.phases[0].epochs: Value 'abc' of type "
                                  "'str' could not be converted to Integer"),
    ("data.bach_size=3", "override data.bach_size=3: data.bach_size: Key 'bach_size' not in 'DataConfig'. Did you "
                         "mean one of: 'batch_size', 'eval_batch_size'?"),
    ("data.batch_size=[1", "override data.batch_size=[1: not valid YAML (did not find expected ',' or ']')"),
    ("data=3", "override data=3: data: Invalid type assigned: int is not a subclass of DataConfig. value: 3"),
    ("seed", "override 'seed' is not of the form key.sub=value"),
])
def test_a_bad_override_is_one_line_naming_key_and_value(override, message, tmp_path, capsys):
    with pytest.raises(ConfigError) as info:
        load_config([TINY_CONFIG], [override])
    assert str(info.value) == message
    assert main(["train", "-c", str(TINY_CONFIG), "--out", str(tmp_path / "x"), override]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize("text, message", [
    ("data:\n  batch_size: [1\n", "not valid YAML"),
    ("data: {batch_size: 1, batch_size: 2}\n", "not valid YAML"),  # a key given twice
    ("data:\n  batch_size: many\n", "data.batch_size: Value 'many' of type 'str' could not be converted"),
    ("data:\n  batch_sise: 3\n", "data.batch_sise: Key 'batch_sise' not in 'DataConfig'"),
])
def test_a_bad_config_file_is_one_line_naming_the_file(text, message, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: ")) as info:
        load_config([path])
    assert message in str(info.value) and "\n" not in str(info.value)
    assert main(["train", "-c", str(path), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_the_pixel_budget_is_a_setting():
    assert load_config([TINY_CONFIG]).data.max_image_pixels == config.MAX_IMAGE_PIXELS == 50_000_000
