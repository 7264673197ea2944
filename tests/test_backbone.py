"""Tests for hclafter.models.backbone: weight formats, QuickGELU selection, identity, errors, transforms.

Everything runs on a tiny random open_clip config, so no real CLIP weights and no network are needed.
"""
from __future__ import annotations

import copy
import hashlib
import socket
import warnings
import zipfile

import open_clip
import pytest
import torch
from PIL import Image
from torch import nn

from hclafter.models.backbone import OPENAI_META_KEYS, BackboneError, load_backbone

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "mlp_ratio": 2.0},
}
# Same structure, other shapes: its weights cannot be loaded into a TINY model.
OTHER_TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 48, "layers": 2, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "mlp_ratio": 2.0},
}
OPENAI_META = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
               "vocab_size": torch.tensor(49408)}


def _tiny_model(quick_gelu: bool, seed: int = 123, cfg: dict = TINY) -> nn.Module:
    torch.manual_seed(seed)
    return open_clip.CLIP(**copy.deepcopy(cfg), quick_gelu=quick_gelu).eval()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _activations(model: nn.Module) -> list[nn.Module]:
    blocks = list(model.visual.transformer.resblocks) + list(model.transformer.resblocks)
    assert blocks
    return [block.mlp.gelu for block in blocks]


def _assert_quick_gelu(model: nn.Module, expected: bool) -> None:
    for act in _activations(model):
        if expected:
            assert isinstance(act, open_clip.transformer.QuickGELU), type(act)
        else:
            assert isinstance(act, nn.GELU) and not isinstance(act, open_clip.transformer.QuickGELU), type(act)


def _assert_same_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k


def _images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(7))


class _OpenAIStyleArchive(nn.Module):
    """Holds tensors under exactly the names of an OpenAI JIT archive's state dict.

    Scripting open_clip's CLIP itself gives an archive whose state dict also holds the
    non-persistent ``attn_mask`` buffer, which OpenAI's archives do not have.
    """

    def forward(self) -> torch.Tensor:
        return self.input_resolution


def _write_openai_jit(state: dict[str, torch.Tensor], path) -> None:
    root = _OpenAIStyleArchive()
    for key, value in {**state, **OPENAI_META}.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            child = module._modules.get(name)
            if child is None:
                child = nn.Module()
                module.add_module(name, child)
            module = child
        module.register_buffer(leaf, value.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.* deprecation notices
        torch.jit.save(torch.jit.script(root), str(path))


# ---------------------------------------------------------------------------------------------
# 1. OpenAI TorchScript archive


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_openai_jit_archive_selects_quick_gelu_and_reproduces_outputs(tmp_path):
    original = _tiny_model(quick_gelu=True)
    state = _state(original)
    path = tmp_path / "tiny-openai.pt"
    _write_openai_jit(state, path)

    # A real TorchScript zip archive holding the weights and the OpenAI metadata keys.
    assert zipfile.is_zipfile(path)
    names = zipfile.ZipFile(path).namelist()
    assert any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        archived = torch.jit.load(str(path)).state_dict()
    assert set(archived) == set(state) | set(OPENAI_META_KEYS)

    bb = load_backbone("tiny", str(path), model_cfg=TINY)
    assert bb.identity["quick_gelu"] is True
    _assert_quick_gelu(bb.model, True)
    _assert_same_weights(bb.model, state)
    assert not bb.model.training

    x = _images()
    with torch.no_grad():
        got = bb.model.encode_image(x)
        want = original.encode_image(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    # The same weights under GELU give different features: the activation choice matters.
    gelu_model = _tiny_model(quick_gelu=False)
    gelu_model.load_state_dict(state)
    with torch.no_grad():
        assert not torch.allclose(gelu_model.encode_image(x), want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 2. Plain state dicts: OpenAI format, open_clip format (.pt wrapper / module. prefix, safetensors)


def test_openai_plain_state_dict_selects_quick_gelu(tmp_path):
    state = _state(_tiny_model(quick_gelu=True))
    path = tmp_path / "openai-sd.pt"
    torch.save({**state, **OPENAI_META}, path)

    bb = load_backbone("tiny", str(path), model_cfg=TINY)
    assert bb.identity["quick_gelu"] is True
    _assert_quick_gelu(bb.model, True)
    _assert_same_weights(bb.model, state)  # metadata keys dropped, weights loaded as is


def test_open_clip_pt_with_wrapper_and_module_prefix_uses_gelu(tmp_path):
    state = _state(_tiny_model(quick_gelu=False))
    path = tmp_path / "openclip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)

    bb = load_backbone("tiny", str(path), model_cfg=TINY)
    assert bb.identity["quick_gelu"] is False
    _assert_quick_gelu(bb.model, False)
    _assert_same_weights(bb.model, state)


def test_open_clip_safetensors_uses_gelu(tmp_path):
    from safetensors.torch import save_file

    state = _state(_tiny_model(quick_gelu=False))
    path = tmp_path / "openclip.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))

    bb = load_backbone("tiny", str(path), model_cfg=TINY)
    assert bb.identity["quick_gelu"] is False
    _assert_quick_gelu(bb.model, False)
    _assert_same_weights(bb.model, state)


def test_quick_gelu_override(tmp_path):
    from safetensors.torch import save_file

    state = _state(_tiny_model(quick_gelu=False))
    path = tmp_path / "openclip.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))

    forced = load_backbone("tiny", str(path), model_cfg=TINY, quick_gelu=True)
    assert forced.identity["quick_gelu"] is True
    _assert_quick_gelu(forced.model, True)
    _assert_same_weights(forced.model, state)

    # ...and the other way round: an OpenAI checkpoint loaded with quick_gelu=False uses GELU.
    openai_path = tmp_path / "openai-sd.pt"
    torch.save({**state, **OPENAI_META}, openai_path)
    off = load_backbone("tiny", str(openai_path), model_cfg=TINY, quick_gelu=False)
    assert off.identity["quick_gelu"] is False
    _assert_quick_gelu(off.model, False)

    # The override is part of the identity, so caches of the two variants never collide.
    auto = load_backbone("tiny", str(path), model_cfg=TINY)
    assert auto.identity_key != forced.identity_key


# ---------------------------------------------------------------------------------------------
# 3. Identity


def test_identity_records_weights_sha256(tmp_path):
    path_a = tmp_path / "a.pt"
    path_b = tmp_path / "b.pt"
    torch.save(_state(_tiny_model(quick_gelu=False, seed=1)), path_a)
    torch.save(_state(_tiny_model(quick_gelu=False, seed=2)), path_b)

    a = load_backbone("tiny", str(path_a), model_cfg=TINY)
    b = load_backbone("tiny", str(path_b), model_cfg=TINY)
    assert a.identity["weights"] == {"file": "a.pt", "sha256": hashlib.sha256(path_a.read_bytes()).hexdigest()}
    assert b.identity["weights"]["sha256"] == hashlib.sha256(path_b.read_bytes()).hexdigest()
    assert a.identity["weights"]["sha256"] != b.identity["weights"]["sha256"]
    assert a.identity["architecture"] == {"name": "tiny", "model_cfg": TINY}
    assert a.identity_key != b.identity_key
    assert len(a.identity_key) == 16

    # Loading the same file again gives the same identity.
    assert load_backbone("tiny", str(path_a), model_cfg=TINY).identity_key == a.identity_key


def test_random_init_identity_is_stable_per_seed():
    first = load_backbone("tiny", model_cfg=TINY, init_seed=5)
    torch.randn(100)  # global RNG state must not matter
    second = load_backbone("tiny", model_cfg=TINY, init_seed=5)
    other = load_backbone("tiny", model_cfg=TINY, init_seed=6)

    assert first.identity == second.identity
    assert first.identity_key == second.identity_key
    assert first.identity["weights"] == "random-init(seed=5)"
    assert first.identity["quick_gelu"] is False
    _assert_same_weights(second.model, _state(first.model))

    assert other.identity != first.identity
    assert other.identity_key != first.identity_key
    sd1, sd3 = first.model.state_dict(), other.model.state_dict()
    assert any(not torch.equal(sd1[k], sd3[k]) for k in sd1)


def test_random_init_does_not_disturb_global_rng_or_caller_config():
    cfg = copy.deepcopy(TINY)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_backbone("tiny", model_cfg=cfg, init_seed=9)
    assert torch.equal(torch.rand(3), expected)
    assert cfg == TINY  # the caller's config is not mutated (e.g. no quick_gelu key added)


# ---------------------------------------------------------------------------------------------
# 4. Errors


def test_missing_path_like_file_raises():
    with pytest.raises(BackboneError, match="not found"):
        load_backbone("ViT-B-32", "/nonexistent/ViT-B-32.pt")


def test_wrong_shape_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "other-tiny.pt"
    torch.save(_state(_tiny_model(quick_gelu=False, cfg=OTHER_TINY)), path)
    with pytest.raises(BackboneError) as info:
        load_backbone("tiny", str(path), model_cfg=TINY)
    assert str(path) in str(info.value)


def test_unknown_architecture_raises():
    with pytest.raises(BackboneError, match="unknown open_clip architecture"):
        load_backbone("NoSuchArch-7")


def test_unknown_tag_lists_tags():
    with pytest.raises(BackboneError) as info:
        load_backbone("ViT-B-32", "no_such_tag")
    msg = str(info.value)
    assert "no_such_tag" in msg and "tags:" in msg
    assert "openai" in msg and "laion2b_s34b_b79k" in msg


def test_offline_tag_download_explains_local_file(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import (already done by open_clip here), so
    # the variable alone would leave it retrying the network; set the parsed constant too.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    # An empty hub cache, so locally cached real weights cannot satisfy the request.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))

    # Guards: nothing may touch the network (it would hang or retry for a long time).
    def no_network(*args, **kwargs):
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_url", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)

    with pytest.raises(BackboneError) as info:
        load_backbone("ViT-B-32", "openai")
    msg = str(info.value)
    assert "backbone.pretrained" in msg
    assert "ViT-B-32/openai" in msg


# ---------------------------------------------------------------------------------------------
# 5. Bad model_cfg


def test_bad_model_cfg_raises():
    bad = copy.deepcopy(TINY)
    bad["vision_cfg"]["no_such_option"] = 1
    with pytest.raises(BackboneError, match="backbone.model_cfg"):
        load_backbone("tiny", model_cfg=bad)


# ---------------------------------------------------------------------------------------------
# 6. Preprocess and tokenizer


def test_preprocess_and_tokenizer_shapes():
    bb = load_backbone("tiny", model_cfg=TINY)
    image = Image.new("RGB", (50, 40), color=(200, 30, 90))
    x = bb.preprocess(image)
    assert isinstance(x, torch.Tensor)
    assert x.shape == (3, 32, 32)
    assert x.dtype == torch.float32

    tokens = bb.tokenizer(["a photo"])
    assert tokens.shape == (1, 77)
    assert tokens.dtype == torch.long
    assert (tokens[0] != 0).sum() == 4  # start, "a", "photo", end

    # The outputs feed the model directly.
    with torch.no_grad():
        assert bb.model.encode_image(x[None]).shape == (1, 32)
        assert bb.model.encode_text(tokens).shape == (1, 32)


def test_tokenizer_follows_model_cfg_context_length():
    cfg = copy.deepcopy(TINY)
    cfg["text_cfg"]["context_length"] = 16
    bb = load_backbone("tiny", model_cfg=cfg)
    assert bb.tokenizer(["a photo", "b"]).shape == (2, 16)


def test_corrupt_checkpoints_and_tag_with_model_cfg_are_clear_errors(tmp_path):
    for name in ("w.safetensors", "w.pt"):
        path = tmp_path / name
        path.write_bytes(b"\x00garbage" * 10)
        with pytest.raises(BackboneError, match=f"{name}: not a readable checkpoint"):
            load_backbone("tiny", str(path), model_cfg=TINY)
    with pytest.raises(BackboneError, match="cannot be combined with an open_clip tag"):
        load_backbone("ViT-B-32", "openai", model_cfg=TINY)
