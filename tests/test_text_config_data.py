import json

import numpy as np
import pytest
import torch

from hclafter.core.config import Config, ConfigError, TextConfig, load_config
from hclafter.data import DataError, Sample, load_splits, stratified_split
from hclafter.data import read_manifest
from hclafter.core.emotions import MIKELS8
from hclafter.models.text import (TextCorpusError, class_texts, encode_texts, load_descriptions, load_templates,
                                  train_text_classifier)


def test_class_texts_are_descriptions_plus_formatted_templates():
    descriptions = {c: [f"a scene of {c} number {i}" for i in range(2)] for c in MIKELS8.classes}
    texts, labels = class_texts(MIKELS8, descriptions, ["a photo of {}.", "{} mood"])
    assert len(texts) == 8 * 4
    assert texts[:4] == ["a scene of amusement number 0", "a scene of amusement number 1",
                         "a photo of amusement.", "amusement mood"]
    assert labels[:4] == [0] * 4 and labels[-1] == 7


def test_shipped_corpus_loads_in_wheel_order():
    descriptions = load_descriptions(MIKELS8)
    assert list(descriptions) == list(MIKELS8.classes)
    assert all(len(v) >= 50 for v in descriptions.values())
    assert all(t.count("{}") == 1 for t in load_templates(MIKELS8))


def test_descriptions_missing_a_class_is_an_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({c: ["x"] for c in MIKELS8.classes if c != "awe"}))
    with pytest.raises(TextCorpusError, match=r"d\.json: no descriptions for class 'awe'"):
        load_descriptions(MIKELS8, str(path))
    path.write_text("{not json")
    with pytest.raises(TextCorpusError, match="invalid JSON at line 1"):
        load_descriptions(MIKELS8, str(path))
    with pytest.raises(TextCorpusError, match="placeholder"):
        load_templates(MIKELS8, ["no placeholder"])


def test_text_embeddings_are_normalised_and_cached_by_backbone_and_texts(tiny_backbone, tmp_path):
    texts = ["a dark alley at night", "a child laughing"]
    first = encode_texts(tiny_backbone, texts, tmp_path)
    assert first.shape == (2, 32)
    assert torch.allclose(first.norm(dim=-1), torch.ones(2), atol=1e-5)
    files = list((tmp_path / "text").glob("*.safetensors"))
    assert len(files) == 1
    # a cache hit returns the stored tensor, without touching the model
    tiny_backbone.model.encode_text, original = None, tiny_backbone.model.encode_text
    try:
        assert torch.equal(encode_texts(tiny_backbone, texts, tmp_path), first)
    finally:
        tiny_backbone.model.encode_text = original
    encode_texts(tiny_backbone, texts[:1], tmp_path)
    assert len(list((tmp_path / "text").glob("*.safetensors"))) == 2


def test_over_long_text_is_rejected(tiny_backbone, tmp_path):
    with pytest.raises(TextCorpusError, match="77-token context"):
        encode_texts(tiny_backbone, ["word " * 100], tmp_path)


def test_text_classifier_learns_separable_features():
    torch.manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    labels = torch.arange(4).repeat_interleave(10)
    features = torch.nn.functional.normalize(centers[labels] + 0.1 * torch.randn(40, 16), dim=-1)
    weight, history = train_text_classifier(features, labels, 4, TextConfig(steps=200, lr=1e-2), seed=0)
    assert weight.shape == (4, 16)
    assert history[-1] < history[0]
    assert ((features @ weight.T).argmax(1) == labels).float().mean() == 1.0
    again, _ = train_text_classifier(features, labels, 4, TextConfig(steps=200, lr=1e-2), seed=0)
    assert torch.equal(weight, again)


def test_config_files_and_overrides_merge(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("model:\n  prompt_tokens: 4\ntrain:\n  loss: {name: ce}\n")
    cfg = load_config([a], ["model.stages=[[12]]", "train.lr.nga=0.5"])
    assert cfg.model.prompt_tokens == 4 and cfg.model.stages == [[12]]
    assert cfg.train.loss.name == "ce" and cfg.train.lr["nga"] == 0.5 and cfg.train.lr["prompts"] == 1e-4
    assert load_config([]) == Config()


@pytest.mark.parametrize("override, message", [
    ("train.loss.lam=1.5", r"train.loss.lam must be in \[0, 1\]"),
    ("train.loss.name=mse", "train.loss.name: 'mse'"),
    ("train.phases=[]", "at least one phase"),
    ("train.phases=[{epochs: 1, train: [adapterz]}]", r"unknown groups \['adapterz'\]"),
    ("model.prompt_tokens=-1", r"model.prompt_tokens must be in \[0, 4096\], got -1"),
    ("model.prompt_tokens=many", "prompt_tokens"),
    ("data.split_ratios=[0.9,0.1,0.1]", "split_ratios"),
    ("precision=fp8", "precision"),
    ("seed", "key.sub=value"),
])
def test_bad_configs_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], [override])


def test_stratified_split_is_seeded_and_stratified():
    samples = [Sample(f"/img/{c}_{i}.png", c, None) for c in range(4) for i in range(40)]
    a = stratified_split(samples, [0.8, 0.05, 0.15], seed=1)
    assert [len(a[s]) for s in ("train", "val", "test")] == [128, 8, 24]
    for split, per_class in (("train", 32), ("val", 2), ("test", 6)):
        assert np.bincount([s.label for s in a[split]], minlength=4).tolist() == [per_class] * 4
    assert stratified_split(list(reversed(samples)), [0.8, 0.05, 0.15], seed=1) == a
    assert stratified_split(samples, [0.8, 0.05, 0.15], seed=2)["test"] != a["test"]


def test_manifest_errors_name_file_and_line(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("path,label\na.png,fear\nb.png,joy\n")
    listing = read_manifest(path, MIKELS8)
    assert [str(p) for p in listing.problems] == [f"{path}:3: unknown class 'joy' for label space mikels8 "
                                                  f"({list(MIKELS8.classes)})"]
    path.write_text("path,label,distribution\na.png,fear,0.5 0.5\n")
    assert "distribution must be 8" in str(read_manifest(path, MIKELS8).problems[0])
    path.write_text("file,label\n")
    with pytest.raises(DataError, match=r"m\.csv:1: header lacks column"):
        read_manifest(path, MIKELS8)


def test_synthetic_data_is_generated_once_and_split(tmp_path):
    cfg = load_config([], ["data.synthetic.per_class=5", "data.synthetic.image_size=16"])
    data = load_splits(cfg.data, 0, tmp_path)
    assert sum(len(v) for v in data.splits.values()) == 40
    assert all(len(data[s]) > 0 for s in ("train", "val", "test"))
    manifests = list(tmp_path.glob("synthetic/*/manifest.csv"))
    assert len(manifests) == 1
    stamp = manifests[0].stat().st_mtime_ns
    load_splits(cfg.data, 0, tmp_path)
    assert manifests[0].stat().st_mtime_ns == stamp


def test_shipped_vitb32_config_asks_for_weights_and_data():
    from .conftest import ROOT

    with pytest.raises(ConfigError, match="backbone.pretrained, data.root"):
        load_config([ROOT / "configs" / "hybrid_vitb32.yaml"])
    cfg = load_config([ROOT / "configs" / "hybrid_vitb32.yaml"], ["backbone.pretrained=w.pt", "data.root=m.csv"])
    defaults = Config()
    assert cfg.model == defaults.model and cfg.train == defaults.train
    assert cfg.text.steps == 500 and cfg.text.lr == 1e-3 and cfg.text.noise_std == 0.1
