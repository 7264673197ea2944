"""Integrity (issue 14): no silent random weights, no minute-long offline retries, config paths
anchored to their file, a total deadline per LLM request, files that honour the umask, no torch with
CVE-2025-32434, verified text caches."""
import os
import socket
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import open_clip
import pytest
import torch
from packaging.requirements import Requirement

from hclafter.models.backbone import BackboneError, backbone_from_config, load_backbone
from hclafter.core.checkpoint import save_checkpoint
from hclafter.core.files import atomic_write_text
from hclafter.apps.cli import main
from hclafter.core.config import BackboneConfig, ConfigError, TextConfig, load_config
from hclafter.apps.describe import ChatClient, ChatError
from hclafter.core.emotions import MIKELS8
from hclafter.models.text import Stage1Error, encode_texts, train_text_classifier, zeroshot_weights

from ..conftest import ROOT, TINY_CFG, TINY_CONFIG

TOY_WEIGHTS = ROOT / "src" / "hclafter" / "resources" / "toy_clip" / "toy_clip.safetensors"


# 6. a backbone without weights only when asked for


def test_a_config_without_weights_is_refused_unless_random_init_is_set():
    with pytest.raises(BackboneError, match=r"no weights: set backbone\.pretrained=.*backbone\.random_init=true"):
        backbone_from_config(BackboneConfig(name="tiny", model_cfg=TINY_CFG))
    chosen = backbone_from_config(BackboneConfig(name="tiny", model_cfg=TINY_CFG, random_init=True))
    assert chosen.identity["weights"] == "random-init(seed=0)"
    # the Python API asks for random weights by leaving out `pretrained`
    assert load_backbone("tiny", model_cfg=TINY_CFG).identity == chosen.identity
    assert load_config([TINY_CONFIG]).backbone.random_init


@pytest.mark.parametrize("command", ["train", "zeroshot"])
def test_cli_refuses_a_backbone_without_weights(command, tmp_path, cache_dir, capsys):
    out = ["--out", str(tmp_path / "run")] if command == "train" else []
    assert main([command, "-c", str(TINY_CONFIG), *out, "backbone.random_init=false", f"cache_dir={cache_dir}"]) == 2
    assert "backbone.random_init=true" in capsys.readouterr().err


def test_random_init_with_weights_is_a_contradiction():
    with pytest.raises(ConfigError, match="backbone.random_init=true contradicts backbone.pretrained"):
        load_config([TINY_CONFIG], [f"backbone.pretrained={TOY_WEIGHTS}"])


# 7. an open_clip tag offline fails in seconds


def test_offline_tag_fails_within_seconds_with_the_clear_message(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # nothing cached

    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_url", offline)
    start = time.monotonic()
    with pytest.raises(BackboneError) as info:
        load_backbone("ViT-B-32", "openai")
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "ViT-B-32/openai" in message and "not in the local cache" in message
    assert "backbone.pretrained=/path/to/weights.pt" in message
    assert hf_constants.HF_HUB_OFFLINE is False  # restored


# 8. relative paths in a config file are relative to that file


def test_config_file_paths_are_relative_to_the_file_and_overrides_to_the_working_directory(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    (conf / "base").mkdir(parents=True)
    (conf / "base" / "common.yaml").write_text("text: {descriptions: words.json}\ncache_dir: ~/hc-cache\n")
    (conf / "run.yaml").write_text(
        "include: [base/common.yaml]\n"
        "backbone: {name: tiny, model_cfg: null, pretrained: weights/w.safetensors}\n"
        "data: {root: ../data, splits_dir: splits, wheel_file: wheel.yaml}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config([conf / "run.yaml"], ["data.splits_dir=mine", "backbone.name=ViT-B-32"])
    assert cfg.text.descriptions == str(conf / "base" / "words.json")
    assert cfg.cache_dir == str(os.path.expanduser("~/hc-cache"))
    assert cfg.backbone.pretrained == str(conf / "weights" / "w.safetensors")
    assert cfg.data.root == str(tmp_path / "data")
    assert cfg.data.wheel_file == str(conf / "wheel.yaml")
    assert cfg.data.splits_dir == str(elsewhere / "mine")  # a command-line override: the working directory
    (conf / "tag.yaml").write_text("backbone: {pretrained: openai}\n")
    assert load_config([conf / "tag.yaml"]).backbone.pretrained == "openai"  # a tag stays a tag


def test_the_demo_config_finds_the_toy_clip_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config([ROOT / "configs" / "demo.yaml"])
    assert cfg.backbone.pretrained == str(TOY_WEIGHTS)
    assert os.path.isfile(cfg.text.descriptions)


def test_a_missing_weights_path_is_reported_as_missing_not_as_a_tag(tmp_path):
    (tmp_path / "run.yaml").write_text("backbone: {pretrained: clip/toy.safetensors}\n")
    cfg = load_config([tmp_path / "run.yaml"], ["backbone.name=tiny", f"backbone.model_cfg={TINY_CFG}"])
    with pytest.raises(BackboneError, match=f"weights file not found: {tmp_path / 'clip' / 'toy.safetensors'}"):
        backbone_from_config(cfg.backbone)


# 10. describe: --timeout bounds the whole request


@pytest.fixture
def trickling_server():
    """Answers every request with a status line, then one header byte every 0.1 s for 6 s."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for _ in range(60):
                try:
                    self.wfile.write(b"X")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.1)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_describe_timeout_is_a_total_deadline_per_request(trickling_server):
    client = ChatClient(trickling_server, "m", timeout=1.0, retries=0)
    start = time.monotonic()
    with pytest.raises(ChatError, match=r"no complete response within 1 s \(--timeout\)"):
        client.complete("describe awe")
    assert 0.9 <= time.monotonic() - start < 2.5


# 12. files honour the umask


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_honour_the_umask(umask, tmp_path):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "config.yaml", "seed: 0\n")
        save_checkpoint(tmp_path / "model.safetensors", {"w": torch.zeros(2)})
    finally:
        os.umask(previous)
    for name in ("config.yaml", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask


# 13. torch without CVE-2025-32434


def test_dependencies_exclude_torch_before_2_6():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = {r.name: r.specifier for r in map(Requirement, project["dependencies"])}
    assert "2.5.1" not in requirements["torch"] and "2.6.0" in requirements["torch"]
    assert "0.20.1" not in requirements["torchvision"] and "0.21.0" in requirements["torchvision"]


# 4. the text-embedding cache is verified; stage 1 stops on a non-finite loss


def test_a_corrupt_text_cache_entry_is_recomputed_with_a_warning(tiny_backbone, tmp_path):
    texts = [t.format(c) for c in MIKELS8.classes for t in ("a photo that evokes {}.", "{} in a picture.")]
    clean = encode_texts(tiny_backbone, texts, tmp_path)
    (entry,) = (tmp_path / "text").glob("*.safetensors")
    data = bytearray(entry.read_bytes())
    for offset in (5, 77, 301):  # flip bits in the stored floats
        data[-offset] ^= 0x40
    entry.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"\.safetensors: text-embedding cache entry unusable \(content hash mismatch.*; rebuilding it"):
        again = encode_texts(tiny_backbone, texts, tmp_path)
    assert torch.equal(again, clean)
    with pytest.warns(UserWarning, match="rebuilding it"):
        entry.write_bytes(b"")
        weights = zeroshot_weights(tiny_backbone, MIKELS8, ["a photo that evokes {}.", "{} in a picture."], tmp_path)
    assert torch.isfinite(weights).all()
    assert torch.equal(encode_texts(tiny_backbone, texts, tmp_path), clean)  # the repaired entry verifies


def test_stage1_stops_on_a_non_finite_loss():
    features = torch.nn.functional.normalize(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    features[3, 2] = 3e38  # what a flipped exponent bit makes of an embedding
    labels = torch.arange(4).repeat(4)
    with pytest.raises(Stage1Error, match=r"stage 1 \(text classifier\): non-finite loss .* 1 of 16 text "
                                          r"embeddings are not finite unit vectors.*backbone\.pretrained"):
        train_text_classifier(features, labels, 4, TextConfig(steps=5), seed=0)
