"""The smaller findings of a hostile user's session (issue 24, point 6), one test each: huge images,
an edited split list under ``report``, conflicting duplicate rows, a full disk before and after the
first saved state, a broken ``state.json``, and what ``describe`` keeps from a model's answer."""
import errno
import hashlib
import json
import re
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from hclafter.apps.cli import main
from hclafter.apps.describe import ChatClient, ChatError, describe_classes, parse_reply
from hclafter.core.config import load_config
from hclafter.data.images import ImageTooLarge, load_rgb
from hclafter.engine import loop
from hclafter.engine.run import RunError, train_run

from ..conftest import TINY_CONFIG

MICRO = ["data.synthetic.per_class=3", "data.synthetic.image_size=32", "text.steps=1", "train.log_with=[]",
         "train.phases=[{epochs: 1, train: [stage_adapters, fusion]}, {epochs: 1, train: [fusion]}]"]
CLASSES = ("amusement", "contentment", "awe", "excitement", "fear", "sadness", "disgust", "anger")


def _png_header(path, width, height):
    """A PNG declaring ``width`` × ``height`` pixels in a few bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) +
                     chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("hostile") / "run"
    assert main(["train", "-c", str(TINY_CONFIG), "--out", str(out), "--quiet", f"cache_dir={cache_dir}", *MICRO]) == 0
    return out


def _manifest(folder, extra_rows=()):
    rows = []
    for i, name in enumerate(CLASSES):
        for j in range(4):
            Image.fromarray(np.full((32, 32, 3), 20 * i + j, np.uint8)).save(folder / f"{name}{j}.png")
            rows.append(f"{name}{j}.png,{name}")
    (folder / "m.csv").write_text("path,label\n" + "\n".join([*rows, *extra_rows]) + "\n")
    return folder / "m.csv"


def test_an_image_over_the_pixel_budget_is_refused_before_decoding_and_counted(tmp_path, cache_dir, capsys):
    huge = _png_header(tmp_path / "huge.png", 12_000, 12_000)  # 2.6 GB and 13 s to decode whole
    with pytest.raises(ImageTooLarge, match=r"huge\.png: 12000×12000 = 144 megapixels to decode, more than "
                                            r"data\.max_image_pixels=50000000"):
        load_rgb(huge)
    jpeg = tmp_path / "big.jpg"
    Image.new("RGB", (9000, 6000), (200, 30, 30)).save(jpeg, quality=50)  # a JPEG decodes reduced: accepted
    assert max(load_rgb(jpeg).size) <= 2250
    with pytest.raises(ImageTooLarge):
        load_rgb(jpeg, max_pixels=1_000_000)
    manifest = _manifest(tmp_path, ["huge.png,awe"])
    assert main(["data", "check", "--format", "manifest", str(manifest)]) == 1
    assert "1 bad input(s): 1 too_large" in capsys.readouterr().out
    summary = train_run(load_config([TINY_CONFIG], [*MICRO, f"cache_dir={cache_dir}", "data.format=manifest",
                                                    f"data.root={manifest}", "data.skip_invalid=true"]),
                        tmp_path / "run", progress=False)
    assert summary["skipped"]["by_kind"] == {"too_large": 1}
    assert sum(summary["num_samples"].values()) == 32


def test_report_refuses_an_edited_split_list_as_eval_does(finished, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    (copy / "checksums.json").unlink()  # as a run made before checksums: run.json's record still holds
    lines = (copy / "splits" / "test.csv").read_text().splitlines(keepends=True)
    (copy / "splits" / "test.csv").write_text("".join(lines[:-2]))  # still a valid list, two images fewer
    for command in ("report", "eval"):
        assert main([command, str(copy)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {copy / 'splits'}: test.csv changed since the run was made") and \
            err.count("\n") == 1, err
    assert not (copy / "report.html").exists()


def test_a_duplicate_row_with_another_label_drops_both(tmp_path, capsys):
    manifest = _manifest(tmp_path, ["awe0.png,fear", "awe1.png,awe"])
    assert main(["data", "check", "--format", "manifest", str(manifest)]) == 1
    out = capsys.readouterr().out
    assert "2 bad input(s): 1 conflicting_labels, 1 duplicate" in out
    assert "awe0.png: listed twice with different labels or distributions (awe, fear): which is right cannot be " \
           "known, so both are left out" in out
    assert "awe1.png: listed twice\n" in out
    assert main(["data", "check", "--format", "manifest", str(manifest), "--skip-invalid"]) == 0
    counts = {name: sum(map(int, row)) for name, *row in re.findall(r"\n(\w+) +(\d+) +(\d+) +(\d+)",
                                                                      capsys.readouterr().out)}
    assert counts["awe"] == 3 and counts["fear"] == 4 and counts["total"] == 31  # awe0 left out, awe1 kept once


def test_a_full_disk_says_resume_only_where_a_state_exists(tmp_path, cache_dir, monkeypatch, capsys):
    from hclafter.core import files

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(files.os, "fsync", full)  # the first file of the run: nothing to resume yet
        assert main(["train", "-c", str(TINY_CONFIG), "--out", str(out), "--quiet", f"cache_dir={cache_dir}",
                     *MICRO]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "then run the command again" in err and "--resume" not in err
    saves = []

    def full_at_second_save(*args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_state(*args, **kwargs)

    save_state = loop.save_state
    with monkeypatch.context() as patch:
        patch.setattr(loop, "save_state", full_at_second_save)
        assert main(["train", "-c", str(TINY_CONFIG), "--out", str(out), "--quiet", f"cache_dir={cache_dir}",
                     *MICRO]) == 2
    assert "then continue with --resume" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0


def test_a_broken_state_json_is_named(finished, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    folder = json.loads((copy / "checkpoints" / "latest.json").read_text())["folder"]
    state = copy / "checkpoints" / folder / "state.json"
    latest = copy / "checkpoints" / "latest.json"
    state.write_text(state.read_text()[:40])
    with pytest.raises(RunError, match=rf"cannot resume, .*{state}: content differs from the sha256 that {latest}"):
        train_run(load_config([copy / "config.yaml"]), copy, progress=False, resume=True)
    pointer = json.loads(latest.read_text())
    pointer["files"][f"checkpoints/{folder}/state.json"] = hashlib.sha256(state.read_bytes()).hexdigest()
    latest.write_text(json.dumps(pointer))  # the record agrees: the JSON itself is still broken
    with pytest.raises(RunError, match=rf"cannot resume, the saved state is unreadable \({state} is unreadable or "
                                       r"corrupt \(.* line \d+ column \d+"):
        train_run(load_config([copy / "config.yaml"]), copy, progress=False, resume=True)


class _Answers:
    model = "stub"

    def __init__(self, text):
        self.text = text

    def complete(self, prompt):  # "Describe <class>. Answer with ..."
        return self.text.replace("{c}", prompt.split()[1].rstrip("."))


def test_describe_keeps_no_control_characters_and_names_a_null_answer(tmp_path):
    dirty = "1. A red\x00 sky \x1b[31mburns\x1b[0m over the sea.\n2. \x1b]0;title\x07Calm\x07 water\x7f at dawn.\r\n"
    assert parse_reply(dirty) == ["A red sky burns over the sea.", "Calm water at dawn."]
    out = tmp_path / "d.json"
    describe_classes(["calm", "joy"], out, _Answers(dirty.replace("sea", "{c}")), per_question=2, progress=False,
                     questions=("Describe {c}.",))
    text = out.read_text(encoding="utf-8")
    assert not any(ord(ch) < 32 and ch != "\n" or 0x7f <= ord(ch) < 0xa0 for ch in text) and "\\u00" not in text
    client = ChatClient("http://127.0.0.1:9/v1", "m")
    null = json.dumps({"choices": [{"message": {"role": "assistant", "content": None},
                                    "finish_reason": "length"}]}).encode()
    with pytest.raises(ChatError, match=r"the model answered without text \(message\.content is null; finish_reason "
                                        r"length\)"):
        client._parse(null)
