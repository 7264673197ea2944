"""``hclafter predict`` for scripts: files, folders, globs and lists, streamed; table, CSV and JSON
lines; per-stage output; unreadable files reported while the others are predicted."""
import csv
import io
import json
import shutil

import numpy as np
import pytest

import hclafter
from hclafter.apps.cli import main

from .tiny_runs import train_tiny


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir):
    return train_tiny(tmp_path_factory.mktemp("predict") / "run", cache_dir, "train.log_with=[]")


@pytest.fixture(scope="module")
def photos(run_dir, tmp_path_factory):
    """Five test images: two at the top of a folder, three in a subfolder."""
    paths = [row["path"] for row in csv.DictReader(open(run_dir / "splits" / "test.csv"))][:5]
    folder = tmp_path_factory.mktemp("photos")
    (folder / "sub").mkdir()
    for i, path in enumerate(paths):
        shutil.copy(path, folder / ("sub" if i >= 2 else "") / f"img{i}.png")
    return folder


def jsonl(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_each_input_kind_gives_one_json_object_per_image(run_dir, photos, tmp_path, capsys, monkeypatch):
    single = str(photos / "img0.png")
    cases = {
        "file": ([single], [single]),
        "folder (recursive)": ([str(photos)], sorted(str(p) for p in photos.rglob("*.png"))),
        "glob": ([str(photos / "sub" / "*.png")], sorted(str(p) for p in (photos / "sub").glob("*.png"))),
    }
    listing = tmp_path / "list.txt"
    listing.write_text(f"# images\n{single}\n\n{photos / 'sub' / 'img2.png'}\n")
    cases["--from LIST"] = (["--from", str(listing)], [single, str(photos / "sub" / "img2.png")])
    for kind, (args, expected) in cases.items():
        assert main(["predict", str(run_dir), *args, "--format", "jsonl"]) == 0, kind
        items = jsonl(capsys.readouterr().out)
        assert [i["image"] for i in items] == expected, kind
    monkeypatch.setattr("sys.stdin", io.StringIO(single + "\n"))
    assert main(["predict", str(run_dir), "--from", "-", "--json"]) == 0
    (item,) = jsonl(capsys.readouterr().out)  # one image: still one object per line, never a bare object or list
    assert set(item) == {"image", "label", "top", "distribution"}
    assert sum(item["distribution"].values()) == pytest.approx(1.0, abs=1e-4)
    assert item["label"] == item["top"][0]["label"] == max(item["distribution"], key=item["distribution"].get)
    assert len(item["top"]) == 3


def test_a_bad_file_is_reported_and_the_others_are_predicted(run_dir, photos, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    inputs = [str(photos / "img0.png"), str(broken), str(tmp_path / "missing.png"), str(tmp_path / "none*.png"),
              str(photos / "img1.png")]
    assert main(["predict", str(run_dir), *inputs, "--format", "jsonl"]) == 1
    captured = capsys.readouterr()
    items = jsonl(captured.out)
    assert [i["image"] for i in items] == inputs
    assert ["error" in i for i in items] == [False, True, True, True, False]
    for bad in inputs[1:4]:
        assert f"error: {bad}" in captured.err
    assert "3 of 5 input(s) could not be read" in captured.err


def test_csv_and_table_with_stages(run_dir, photos, capsys):
    assert main(["predict", str(run_dir), str(photos), "--format", "csv", "--stages", "--batch-size", "2"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 5 and rows[0]["error"] == ""
    assert {"p_awe", "s1_awe", "s3_anger"} <= set(rows[0])
    assert sum(float(rows[0][f"s2_{c}"]) for c in ("amusement", "contentment", "awe", "excitement", "fear",
                                                     "sadness", "disgust", "anger")) == pytest.approx(1, abs=1e-4)
    assert main(["predict", str(run_dir), str(photos / "img0.png"), "--stages", "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(str(photos / "img0.png")) and lines[0].count(", ") == 1  # two emotions
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["stage 1 (blocks 5–7)", "stage 2 (blocks 8–9)",
                                                                  "stage 3 (blocks 10–12)"]


def test_streamed_batches_match_one_batch_and_the_api_gives_stages(run_dir, photos):
    run = hclafter.load_run(run_dir)
    images = sorted(str(p) for p in photos.rglob("*.png"))
    whole = run.predict(images, stages=True)
    assert whole.stage_distributions.shape == (3, 5, 8) and whole.stage_blocks == [[5, 6, 7], [8, 9], [10, 11, 12]]
    streamed = list(run.predict_stream(images, batch_size=2, stages=True))
    assert np.abs(np.stack([r.distribution for r in streamed]) - whole.distributions).max() < 1e-5
    assert [r.label for r in streamed] == whole.labels
    assert run.predict(images).stage_distributions is None


def test_predict_without_inputs_says_what_to_give(run_dir, capsys):
    assert main(["predict", str(run_dir)]) == 2
    assert "--from LIST" in capsys.readouterr().err
