"""Dataset readers on small fake roots in each dataset's real layout."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hclafter.core.config import load_config
from hclafter.data import load_splits
from hclafter.data import DataError
from hclafter.core.emotions import EKMAN6, MIKELS8, POLARITY2

RNG = np.random.default_rng(0)


def image(path: Path, mode: str = "RGB", size=(20, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = RNG.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(path)
    return path


def load(tmp_path, fmt, root, *overrides):
    cfg = load_config([], [f"data.format={fmt}", f"data.root={root}", *overrides])
    return load_splits(cfg.data, 0, tmp_path / "cache")


def labels_by_file(data):
    return {Path(s.path).name: data.wheel.classes[s.label] for split in data.splits.values() for s in split}


EMOTION6_ORDER = ["anger", "disgust", "fear", "joy", "sadness", "surprise"]


def fake_emotion6(root: Path, per_class: int = 5) -> Path:
    rows = ["[image_filename]\t[valence]\t[arousal]\t[prob. anger]\t[prob. disgust]\t[prob. fear]\t[prob. joy]\t"
            "[prob. sadness]\t[prob. surprise]\t[prob. neutral]"]
    for k, keyword in enumerate(EMOTION6_ORDER):
        for n in range(1, per_class + 1):
            image(root / "images" / keyword / f"{n}.jpg")
            probs = [0.0] * 7
            probs[k] = 0.4
            probs[(k + 1) % 6] = 0.2  # a neighbour gets votes too
            probs[6] = 0.4  # neutral, dropped
            rows.append("\t".join([f"{keyword}/{n}.jpg", "5.0", "4.0", *[f"{p:g}" for p in probs]]))
    (root / "ground_truth.txt").write_text("\n".join(rows) + "\n")
    return root


def test_emotion6_labels_distributions_and_split(tmp_path):
    root = fake_emotion6(tmp_path / "Emotion6")
    data = load(tmp_path, "emotion6", root)
    assert data.wheel == EKMAN6
    assert sum(map(len, data.splits.values())) == 30
    assert [len(data[s]) for s in ("train", "val", "test")] == [18, 6, 6]  # 5 per class: 1 val, 1 test, 3 train
    sample = next(s for s in data["train"] if "/joy/" in s.path)
    assert EKMAN6.classes[sample.label] == "joy"
    # joy votes 0.4, sadness (next in Emotion6's column order) 0.2, neutral dropped -> 2/3, 1/3 by name
    expected = dict(zip(EKMAN6.classes, sample.distribution))
    assert expected["joy"] == pytest.approx(2 / 3) and expected["sadness"] == pytest.approx(1 / 3)
    assert sum(sample.distribution) == pytest.approx(1.0)


def test_emotion6_argmax_label_and_malformed_lines(tmp_path):
    root = fake_emotion6(tmp_path / "E6", per_class=3)
    table = root / "ground_truth.txt"
    lines = table.read_text().splitlines()
    # anger/1.jpg: make disgust the most voted emotion
    lines[1] = "anger/1.jpg\t5\t4\t0.1\t0.5\t0\t0\t0\t0\t0.4"
    lines.append("anger/2.jpg\t5\t4\t0.1")
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"ground_truth\.txt:20.*expected 10 fields"):
        load(tmp_path, "emotion6", root)
    data = load(tmp_path, "emotion6", root, "data.emotion6_label=argmax", "data.skip_invalid=true")
    anger_one = next(s for split in data.splits.values() for s in split if s.path.endswith("anger/1.jpg"))
    assert EKMAN6.classes[anger_one.label] == "disgust"
    assert data.skipped_summary()["by_kind"] == {"malformed_line": 1}


def fake_emoset(root: Path) -> Path:
    order = ["amusement", "awe", "contentment", "excitement", "anger", "disgust", "fear", "sadness"]
    (root).mkdir(parents=True)
    (root / "info.json").write_text(json.dumps({"emotion": {"label2idx": {e: i for i, e in enumerate(order)}}}))
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        entries = []
        for emotion in order:
            for i in range(n):
                ident = f"{emotion}_{split}{i}"
                image(root / "image" / emotion / f"{ident}.jpg")
                entries.append([emotion, ident, f"image/{emotion}/{ident}.jpg", f"annotation/{emotion}/{ident}.json"])
        (root / f"{split}.json").write_text(json.dumps(entries))
    return root


def test_emoset_official_split_and_labels_by_name(tmp_path):
    data = load(tmp_path, "emoset", fake_emoset(tmp_path / "EmoSet-118K"))
    assert data.wheel == MIKELS8
    assert [len(data[s]) for s in ("train", "val", "test")] == [24, 8, 16]
    for split in data.splits.values():
        for s in split:
            assert MIKELS8.classes[s.label] == Path(s.path).parent.name  # info.json's index order is not used


def test_emoset_bad_entries_and_unknown_emotions(tmp_path):
    root = fake_emoset(tmp_path / "E")
    entries = json.loads((root / "val.json").read_text())
    entries += [["joy", "x", "image/joy/x.jpg", "a.json"], ["amusement"]]
    (root / "val.json").write_text(json.dumps(entries))
    with pytest.raises(DataError) as info:
        load(tmp_path, "emoset", root)
    message = str(info.value)
    assert "val.json:entry 8: unknown emotion 'joy'" in message and "val.json:entry 9" in message
    (root / "train.json").unlink()
    with pytest.raises(DataError, match=r"train\.json: missing"):
        load(tmp_path, "emoset", root)


def fake_imagefolder(root: Path, classes, per_class=5, splits=None, case=str.lower):
    for c in classes:
        if splits:
            for split, n in splits.items():
                for i in range(n):
                    image(root / split / case(c) / f"{c}{split}{i}.jpg")
        else:
            for i in range(per_class):
                image(root / case(c) / f"{c}{i}.jpg")
    return root


def test_fi_with_split_folders_and_capitalised_names(tmp_path):
    root = fake_imagefolder(tmp_path / "FI", MIKELS8.classes, splits={"train": 4, "val": 1, "test": 2},
                            case=str.capitalize)
    data = load(tmp_path, "fi", root)
    assert [len(data[s]) for s in ("train", "val", "test")] == [32, 8, 16]
    assert all(MIKELS8.classes[s.label] == Path(s.path).parent.name.lower() for s in data["test"])


def test_fi_without_val_carves_validation_from_train(tmp_path):
    root = fake_imagefolder(tmp_path / "FI", MIKELS8.classes, splits={"train": 10, "test": 2})
    data = load(tmp_path, "fi", root)
    assert len(data["test"]) == 16 and len(data["val"]) == 8 and len(data["train"]) == 72


def test_flat_folder_split_is_stratified_and_seeded(tmp_path):
    root = fake_imagefolder(tmp_path / "FI", MIKELS8.classes, per_class=20)
    a = load(tmp_path, "fi", root)
    b = load(tmp_path, "fi", root)
    c = load(tmp_path, "fi", root, "seed=1")  # seed is top-level; load() uses seed 0 regardless
    assert a.splits == b.splits == c.splits
    cfg = load_config([], ["data.format=fi", f"data.root={root}"])
    d = load_splits(cfg.data, 1, tmp_path / "cache")
    assert d["test"] != a["test"] and sorted(s.path for s in d["test"] + d["val"] + d["train"]) == \
        sorted(s.path for s in a["test"] + a["val"] + a["train"])
    for split, per_class in (("train", 16), ("val", 1), ("test", 3)):
        assert np.bincount([s.label for s in a[split]], minlength=8).tolist() == [per_class] * 8


def test_class_folder_order_does_not_change_labels(tmp_path):
    one = fake_imagefolder(tmp_path / "one", MIKELS8.classes, per_class=3)
    two = fake_imagefolder(tmp_path / "two", list(reversed(MIKELS8.classes)), per_class=3)
    assert labels_by_file(load(tmp_path, "fi", one)) == labels_by_file(load(tmp_path, "fi", two))


def test_unknown_class_folder_is_reported(tmp_path):
    root = fake_imagefolder(tmp_path / "FI", list(MIKELS8.classes) + ["joy"], per_class=3)
    with pytest.raises(DataError, match=r"unknown_class.*joy: folder name is not a class of mikels8"):
        load(tmp_path, "fi", root)


def test_twitter_is_two_class(tmp_path):
    root = fake_imagefolder(tmp_path / "tw", ["positive", "negative"], per_class=6)
    data = load(tmp_path, "twitter1", root)
    assert data.wheel == POLARITY2
    assert {POLARITY2.classes[s.label] for s in data["train"]} == {"positive", "negative"}


def test_artphoto_labels_from_file_names(tmp_path):
    root = tmp_path / "ArtPhoto"
    for name in ("amusement", "sad", "contentment", "fear"):
        for i in range(3):
            image(root / f"{name}_{i}.jpg")
    data = load(tmp_path, "artphoto", root, "data.split_ratios=[0.34,0.33,0.33]")
    labels = labels_by_file(data)
    assert labels["sad_0.jpg"] == "sadness" and labels["amusement_2.jpg"] == "amusement"


def test_abstract_votes_by_header_name_and_ties_dropped(tmp_path):
    root = tmp_path / "abstract"
    header = "'imageName','Amusement','Anger','Awe','Content','Disgust','Excitement','Fear','Sad'"
    rows = [header]
    for i in range(12):
        votes = [0] * 8
        votes[i % 4] = 5 + i
        votes[(i + 1) % 4] = 2
        image(root / "images" / f"{i}.jpg")
        rows.append(f"'{i}.jpg'," + ",".join(map(str, votes)))
    image(root / "images" / "tie.jpg")
    rows.append("'tie.jpg',3,3,0,0,0,0,0,0")
    (root / "ABSTRACT_groundTruth.csv").write_text("\n".join(rows) + "\n")
    data = load(tmp_path, "abstract", root, "data.split_ratios=[0.5,0.25,0.25]")
    labels = labels_by_file(data)
    assert "tie.jpg" not in labels
    assert labels["0.jpg"] == "amusement" and labels["1.jpg"] == "anger" and labels["3.jpg"] == "contentment"
    sample = next(s for split in data.splits.values() for s in split if s.path.endswith("/0.jpg"))
    d = dict(zip(MIKELS8.classes, sample.distribution))
    assert d["amusement"] == pytest.approx(5 / 7) and d["anger"] == pytest.approx(2 / 7)
    assert data.skipped_summary()["by_kind"] == {"tied_votes": 1}


def test_ldl_columns_are_read_by_name(tmp_path):
    root = tmp_path / "FlickrLDL"
    order = ["amusement", "awe", "contentment", "excitement", "anger", "disgust", "fear", "sadness"]  # positives first
    rows = ["image " + " ".join(order)]
    for i in range(24):
        votes = [0] * 8
        votes[i % 8] = 7
        votes[(i + 3) % 8] = 4
        image(root / "images" / f"img{i}.jpg")
        rows.append(f"img{i}.jpg " + " ".join(map(str, votes)))
    (root / "ground_truth.txt").write_text("\n".join(rows) + "\n")
    data = load(tmp_path, "flickrldl", root, "data.split_ratios=[0.5,0.25,0.25]")
    labels = labels_by_file(data)
    assert labels["img1.jpg"] == "awe" and labels["img4.jpg"] == "anger"
    (root / "ground_truth.txt").write_text("img0.jpg 1 2 3 4 5 6 7 8\n")
    with pytest.raises(DataError, match=r"ground_truth\.txt:1: header .* lacks columns"):
        load(tmp_path, "flickrldl", root)


def test_manifest_jsonl_with_named_distributions(tmp_path):
    root = tmp_path / "m"
    lines = []
    for i, c in enumerate(["fear", "awe", "anger"] * 3):
        image(root / f"{i}.png")
        lines.append(json.dumps({"path": f"{i}.png", "label": c, "distribution": {c: 0.75, "sadness": 0.25}}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    data = load(tmp_path, "manifest", root / "manifest.jsonl", "data.split_ratios=[0.34,0.33,0.33]")
    s = data["train"][0]
    d = dict(zip(MIKELS8.classes, s.distribution))
    assert d[MIKELS8.classes[s.label]] == 0.75 and d["sadness"] == 0.25


def test_polarity_few_shot_and_split_round_trip(tmp_path):
    root = fake_imagefolder(tmp_path / "FI", MIKELS8.classes, per_class=10)
    few = load(tmp_path, "fi", root, "data.few_shot=2")
    assert np.bincount([s.label for s in few["train"]]).tolist() == [2] * 8
    assert few["train"] == load(tmp_path, "fi", root, "data.few_shot=2")["train"]
    polar = load(tmp_path, "fi", root, "data.polarity=true")
    assert polar.wheel == POLARITY2
    for s in polar["train"]:
        folder = Path(s.path).parent.name
        assert POLARITY2.classes[s.label] == ("positive" if MIKELS8.polarity[MIKELS8.index(folder)] else "negative")
    from hclafter.data import write_manifest

    full = load(tmp_path, "fi", root)
    for split in ("train", "val", "test"):
        write_manifest(tmp_path / "splits" / f"{split}.csv", full[split], full.wheel, split)
    again = load(tmp_path, "fi", root, f"data.splits_dir={tmp_path / 'splits'}", "data.split_ratios=[0.5,0.25,0.25]")
    assert again.splits == full.splits


def test_custom_wheel_with_distance_matrix(tmp_path):
    from hclafter.core.emotions import strategy1

    wheel_file = tmp_path / "w.yaml"
    wheel_file.write_text("name: three\nclasses: [calm, joy, dread]\npolarity: [1, 1, 0]\n"
                          "distances: [[0, 1, 3], [1, 0, 2], [3, 2, 0]]\n")
    root = fake_imagefolder(tmp_path / "d", ["calm", "joy", "dread"], per_class=4)
    data = load(tmp_path, "imagefolder", root, f"data.wheel_file={wheel_file}")
    assert data.wheel.classes == ("calm", "joy", "dread")
    d = strategy1(data.wheel, 0, sigma=1.0, epsilon=0.0)
    g = np.exp(-np.array([0, 1, 9]) / 2)
    assert np.allclose(d, g / g.sum())


@pytest.mark.parametrize("name", ["abstract", "artphoto", "emoset", "emotion6", "fi", "flickrldl", "imagefolder",
                                  "manifest", "twitter1", "twitter2", "twitterldl"])
def test_every_reader_has_a_dataset_config_that_combines_with_a_method(name):
    from hclafter.data import READERS

    from .conftest import ROOT

    cfg = load_config([ROOT / "configs" / "methods" / "hybrid.yaml", ROOT / "configs" / "datasets" / f"{name}.yaml"],
                      ["backbone.pretrained=w.pt", "data.root=/data/x"])
    assert cfg.data.format == name and name in READERS
    with pytest.raises(Exception, match="data.root"):
        load_config([ROOT / "configs" / "methods" / "hybrid.yaml", ROOT / "configs" / "datasets" / f"{name}.yaml"],
                    ["backbone.pretrained=w.pt"])
