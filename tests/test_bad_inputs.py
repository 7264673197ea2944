"""Bad input: handled correctly, or a clear error naming the file, or a counted, listed skip."""
import json

import numpy as np
import pytest
from PIL import Image

from hclafter.apps.cli import main
from hclafter.core.config import load_config
from hclafter.data import load_splits
from hclafter.data import DataError
from hclafter.core.emotions import MIKELS8
from hclafter.data.images import ImageError, load_rgb, to_rgb
from hclafter.models.text import TextCorpusError, class_texts, load_descriptions, load_templates

from .conftest import TINY_CONFIG
from .test_datasets import fake_emoset, fake_emotion6, fake_imagefolder, image


def test_colour_modes_become_8bit_rgb(tmp_path):
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(Image.new("L", (4, 4), 77)).getpixel((0, 0)) == (77, 77, 77)
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    assert to_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)
    half = Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))  # 32896 / 65535 * 255 = 128
    assert to_rgb(half).getpixel((0, 0)) == (128, 128, 128)
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)  # composited on white, not black
    half_red = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    assert to_rgb(half_red).getpixel((0, 0)) == (255, 127, 127)
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)
    # a 16-bit PNG on disk reads the same way
    path = tmp_path / "deep.png"
    sixteen.save(path)
    assert load_rgb(path).getpixel((0, 0)) == (255, 255, 255)


def test_unreadable_files_raise_image_error_naming_the_file(tmp_path, monkeypatch):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg: empty file"):
        load_rgb(empty)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 4)
    with pytest.raises(ImageError, match=r"corrupt\.jpg: cannot decode"):
        load_rgb(corrupt)
    good = image(tmp_path / "good.jpg", size=(200, 200))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageError, match=r"truncated\.jpg: cannot decode"):
        load_rgb(truncated)
    with pytest.raises(ImageError, match=r"missing\.jpg: file not found"):
        load_rgb(tmp_path / "missing.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match=r"good\.jpg: image too large"):
        load_rgb(tmp_path / "good.png" if False else good)


def test_huge_jpeg_is_decoded_at_reduced_size(tmp_path):
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (4096, 3072), (10, 200, 30)).save(path)
    out = load_rgb(path)
    assert max(out.size) <= 2048 and out.getpixel((5, 5))[1] > 150


def _bad_fi_root(tmp_path):
    root = fake_imagefolder(tmp_path / "FI", MIKELS8.classes, per_class=4)
    (root / "fear" / "empty.jpg").write_bytes(b"")
    (root / "awe" / "corrupt.jpg").write_bytes(b"not an image at all")
    good = root / "anger" / "anger0.jpg"
    (root / "anger" / "truncated.jpg").write_bytes(good.read_bytes()[:100])
    (root / "awe" / "notes.txt").write_text("hello")
    image(root / "joy" / "x.jpg")
    Image.new("CMYK", (20, 20)).save(root / "sadness" / "cmyk.jpg")
    Image.new("LA", (20, 20)).save(root / "sadness" / "alpha.png")
    Image.fromarray(np.zeros((20, 20), dtype=np.uint16)).save(root / "sadness" / "deep.png")
    return root


def test_bad_images_stop_training_with_every_problem_listed(tmp_path):
    root = _bad_fi_root(tmp_path)
    cfg = load_config([], ["data.format=fi", f"data.root={root}"])
    with pytest.raises(DataError) as info:
        load_splits(cfg.data, 0, tmp_path)
    message = str(info.value)
    for expected in ("empty.jpg: empty file", "corrupt.jpg: cannot decode", "truncated.jpg: cannot decode",
                     "notes.txt: unexpected file type", "joy: folder name is not a class", "data.skip_invalid=true"):
        assert expected in message


def test_bad_images_are_skipped_counted_and_listed_when_allowed(tmp_path):
    root = _bad_fi_root(tmp_path)
    cfg = load_config([], ["data.format=fi", f"data.root={root}", "data.skip_invalid=true"])
    data = load_splits(cfg.data, 0, tmp_path)
    summary = data.skipped_summary()
    assert summary["count"] == 5
    assert summary["by_kind"] == {"unknown_class": 1, "not_an_image": 1, "unreadable_image": 3}
    kept = {s.path.rsplit("/", 1)[-1] for split in data.splits.values() for s in split}
    assert {"cmyk.jpg", "alpha.png", "deep.png"} <= kept  # odd colour modes are converted, not skipped
    assert not {"empty.jpg", "corrupt.jpg", "truncated.jpg"} & kept


def test_manifest_missing_duplicate_and_malformed_entries(tmp_path):
    root = tmp_path / "m"
    rows = ["path,label,split"]
    for i in range(3):
        for c in ("fear", "awe"):
            image(root / f"{c}{i}.png")
            rows.append(f"{c}{i}.png,{c},{['train', 'val', 'test'][i]}")
    rows += ["fear0.png,fear,test", "gone.png,awe,train", ",awe,train", "x.png,awe,holdout"]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config([], ["data.format=manifest", f"data.root={root}", "data.skip_invalid=true"])
    data = load_splits(cfg.data, 0, tmp_path)
    kinds = [(p.kind, p.where.rsplit("/", 1)[-1]) for p in data.skipped]
    assert ("duplicate", "fear0.png") in kinds and ("missing_file", "gone.png") in kinds
    assert ("malformed_line", "manifest.csv:10") in kinds and ("malformed_line", "manifest.csv:11") in kinds
    assert [len(data[s]) for s in ("train", "val", "test")] == [2, 2, 2]


def test_empty_split_is_an_error(tmp_path):
    root = tmp_path / "m"
    rows = ["path,label,split"] + [f"{i}.png,fear,train" for i in range(3)] + ["t.png,fear,test"]
    for i in range(3):
        image(root / f"{i}.png")
    image(root / "t.png")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    # no val rows: val is carved from train; with a single train image per class nothing is left to carve
    cfg = load_config([], ["data.format=manifest", f"data.root={root}", "data.split_ratios=[0.8,0.2,0.0]"])
    data = load_splits(cfg.data, 0, tmp_path)
    assert len(data["val"]) == 1
    (root / "manifest.csv").write_text("path,label,split\n0.png,fear,train\n1.png,fear,val\n")
    with pytest.raises(DataError, match="the test split is empty"):
        load_splits(cfg.data, 0, tmp_path)


def test_descriptions_with_over_long_sentences_name_the_class(tiny_backbone, tmp_path):
    descriptions = load_descriptions(MIKELS8)
    descriptions["awe"] = descriptions["awe"] + ["a very long sentence " * 30]
    with pytest.raises(TextCorpusError, match=r"my\.json: 1 text\(s\) exceed the 77-token context, e\.g\. class 'awe'"):
        class_texts(MIKELS8, descriptions, load_templates(MIKELS8), tiny_backbone.tokenizer, "my.json")
    path = tmp_path / "d.json"
    path.write_text(json.dumps({**{c: ["x y"] for c in MIKELS8.classes}, "joy": ["z"]}))
    with pytest.raises(TextCorpusError, match=r"classes \['joy'\] are not in label space mikels8"):
        load_descriptions(MIKELS8, str(path))


def test_train_on_fake_emotion6_emoset_and_fi_roots(tmp_path, cache_dir):
    roots = {"emotion6": fake_emotion6(tmp_path / "E6"), "emoset": fake_emoset(tmp_path / "ES"),
             "fi": fake_imagefolder(tmp_path / "FI", MIKELS8.classes, per_class=5)}
    for fmt, root in roots.items():
        out = tmp_path / f"run-{fmt}"
        assert main(["train", "-c", str(TINY_CONFIG), f"data.format={fmt}", f"data.root={root}", "--out", str(out),
                     "--quiet", f"cache_dir={cache_dir}", "train.phases=[{epochs: 1, train: [fusion, classifier]}]"]) == 0
        summary = json.loads((out / "summary.json").read_text())
        run = json.loads((out / "run.json").read_text())
        assert run["label_space"] == ("ekman6" if fmt == "emotion6" else "mikels8")
        assert summary["skipped"]["count"] == 0
        assert summary["test"]["num_samples"] == {"emotion6": 6, "emoset": 16, "fi": 8}[fmt]


def test_skipped_inputs_are_listed_in_the_run_summary(tmp_path, cache_dir):
    root = fake_imagefolder(tmp_path / "FI", MIKELS8.classes, per_class=4)
    (root / "fear" / "broken.jpg").write_bytes(b"junk")
    out = tmp_path / "run"
    assert main(["train", "-c", str(TINY_CONFIG), "data.format=fi", f"data.root={root}", "data.skip_invalid=true",
                 "--out", str(out), "--quiet", f"cache_dir={cache_dir}",
                 "train.phases=[{epochs: 1, train: [fusion]}]"]) == 0
    skipped = json.loads((out / "summary.json").read_text())["skipped"]
    assert skipped["count"] == 1 and skipped["items"][0]["kind"] == "unreadable_image"
    assert skipped["items"][0]["where"].endswith("fear/broken.jpg")


def test_data_check_reports_and_sets_the_exit_status(tmp_path, capsys):
    root = _bad_fi_root(tmp_path)
    assert main(["data", "check", "--format", "fi", str(root)]) == 1
    out = capsys.readouterr().out
    assert "training would fail" in out and "[unreadable_image]" in out and "corrupt.jpg" in out
    assert "amusement" in out and "total" in out
    assert main(["data", "check", "--format", "fi", str(root), "--skip-invalid"]) == 0
    assert "5 bad input(s) will be skipped" in capsys.readouterr().out
    good = fake_imagefolder(tmp_path / "good", MIKELS8.classes, per_class=4)
    assert main(["data", "check", "--format", "fi", str(good)]) == 0
    assert "ok: training can start" in capsys.readouterr().out
