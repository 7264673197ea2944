"""The pre-decoded image store: the JPEG path's tensors for evaluation, augmented training, stale
entries decoded again, and runs that read from it."""
import json
import os

import numpy as np
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from hclafter.apps.cli import main
from hclafter.core.config import ConfigError, load_config
from hclafter.data import EmotionImages, Sample, make_loader
from hclafter.data.store import ImageStore, InputView, resize_steps, stored_datasets
from hclafter.data.views import crop_flip_transform
from hclafter.core.emotions import MIKELS8
from hclafter.engine.run import train_run

from .conftest import TINY_CONFIG

CFG = PreprocessCfg(size=64)
SHORT = ["data.synthetic.per_class=8", "text.steps=30", "train.phases=[{epochs: 1, train: [stage_adapters, prompts]}]"]


@pytest.fixture
def photos(tmp_path):
    """Landscape and portrait JPEGs, a grayscale PNG and an RGBA PNG, with real structure."""
    rng = np.random.default_rng(0)
    shapes = [(120, 160, "jpg"), (150, 90, "jpg"), (64, 64, "png"), (77, 101, "png")]
    samples = []
    for i, (h, w, ext) in enumerate(shapes):
        y, x = np.mgrid[:h, :w]
        rgb = np.stack([(x * 255 // w), (y * 255 // h), rng.integers(0, 255, (h, w))], -1).astype(np.uint8)
        image = Image.fromarray(rgb)
        image = image.convert("L") if i == 2 else image.convert("RGBA") if i == 3 else image
        path = tmp_path / "images" / f"{i}.{ext}"
        path.parent.mkdir(exist_ok=True)
        image.save(path)
        samples.append(Sample(str(path), i % 8))
    return samples


def datasets(samples, transform=None):
    transform = transform or image_transform_v2(CFG, is_train=False)
    return {"train": EmotionImages(samples[:2], MIKELS8, transform), "test": EmotionImages(samples[2:], MIKELS8, transform)}


def batch(dataset):
    return next(iter(make_loader(dataset, len(dataset), False, 0)))["image"]


def test_store_batches_equal_the_jpeg_path(photos, tmp_path):
    jpeg = datasets(photos)
    stored, view = stored_datasets(jpeg, CFG, load_config().data, tmp_path / "cache", progress=False)
    for split in ("train", "test"):
        images = batch(stored[split])
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 64, 64)
        expected = batch(jpeg[split])
        assert (view(images, train=False) - expected).abs().max() <= 1 / 255  # in fact equal:
        assert torch.equal(view(images, train=False), expected)
        assert torch.equal(view(images, train=True), expected)  # no augmentation asked for
    assert view(expected, train=True) is expected  # float batches pass


def test_training_augments_with_random_crops_and_flips(photos, tmp_path):
    data = load_config(overrides=["data.train_augment=crop_flip"]).data
    stored, view = stored_datasets(datasets(photos), CFG, data, tmp_path / "cache", progress=False)
    images = batch(stored["train"])
    assert images.shape[1:] == (3, 73, 73)  # the margin for random crops: 64 + 64 // 7
    assert batch(stored["test"]).shape[1:] == (3, 64, 64)  # evaluation keeps the exact view
    torch.manual_seed(0)
    repeated = images[:1].expand(64, -1, -1, -1)
    views = view(repeated, train=True)
    assert views.shape == (64, 3, 64, 64)
    scaled = view.mean + view.std * views  # back to [0, 1]
    windows = {(top, left, flip) for top in range(10) for left in range(10) for flip in (False, True)}
    seen = set()
    for v in scaled:
        for top, left, flip in windows:
            crop = images[0, :, top:top + 64, left:left + 64].float() / 255
            if torch.allclose(v, crop.flip(-1) if flip else crop, atol=1e-6):
                seen.add((top, left, flip))
                break
        else:
            pytest.fail("an augmented view is not a crop of the stored image")
    assert len(seen) > 20 and {flip for _, _, flip in seen} == {False, True}
    # the JPEG path's counterpart draws from the same windows of the same resize
    margin = np.array(resize_steps(CFG, margin=True)(Image.open(photos[0].path).convert("RGB")))
    assert torch.equal(torch.from_numpy(margin).permute(2, 0, 1), images[0])
    assert crop_flip_transform(CFG)(Image.open(photos[0].path).convert("RGB")).shape == (3, 64, 64)


def test_a_changed_image_file_invalidates_its_entry(photos, tmp_path):
    cache, data = tmp_path / "cache", load_config().data
    stored, view = stored_datasets(datasets(photos), CFG, data, cache, progress=False)
    before = batch(stored["test"])
    changed = photos[2].path
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))  # a new stamp even where the clock is coarse
    paths = [s.path for s in photos]
    steps = resize_steps(CFG)
    store = ImageStore.open(paths, steps, (3, 64, 64), cache)
    assert store.update(paths, steps, progress=False) == 1  # only the changed file is decoded again
    assert store.update(paths, steps, progress=False) == 0
    after = batch(stored["test"])  # the datasets read the updated row
    assert torch.equal(after[1], before[1]) and not torch.equal(after[0], before[0])
    assert torch.equal(view(after, train=False), batch(datasets(photos)["test"]))


def test_runs_read_the_store_and_prepare_fills_it(tmp_path):
    cache = tmp_path / "cache"
    assert main(["data", "prepare", "-c", str(TINY_CONFIG), f"cache_dir={cache}", *SHORT]) == 0
    (store,) = (cache / "images").iterdir()
    assert np.load(store)["stamp"].all()  # every image of every split decoded
    written = store.stat().st_mtime_ns
    cfg = lambda *more: load_config([TINY_CONFIG], [*SHORT, f"cache_dir={cache}", *more])
    stored = train_run(cfg(), tmp_path / "stored", progress=False)
    assert store.stat().st_mtime_ns == written  # nothing decoded again
    plain = train_run(cfg("data.image_store=off"), tmp_path / "plain", progress=False)
    assert stored == plain  # the same tensors, so the same run to the bit
    augmented = train_run(cfg("data.train_augment=crop_flip"), tmp_path / "augmented", progress=False)
    assert len(list((cache / "images").iterdir())) == 2  # the margin store for the training split
    assert augmented["test"]["num_samples"] == plain["test"]["num_samples"]
    saved = json.loads((tmp_path / "augmented" / "run.json").read_text())
    assert saved["method"] == "hybrid"


def test_augmentation_is_for_labelled_training_only():
    with pytest.raises(ConfigError, match="train_augment"):
        load_config([TINY_CONFIG], ["train.supervision=pseudo", "train.loss.name=ce", "data.train_augment=crop_flip"])
    with pytest.raises(ConfigError, match="image_store"):
        load_config([TINY_CONFIG], ["data.image_store=always"])
    assert not load_config([TINY_CONFIG], ["data.image_store=off"]).data.image_store


def test_input_view_is_torchvision_arithmetic():
    images = torch.randint(0, 256, (2, 3, 70, 66), dtype=torch.uint8)
    view = InputView(CFG, augment=False)
    top, left = 3, 1  # torchvision's CenterCrop offsets for 70×66 → 64×64
    expected = torch.stack([image_transform_v2(CFG, is_train=False).transforms[-1](
        images[i, :, top:top + 64, left:left + 64].float().div(255)) for i in range(2)])
    assert torch.equal(view(images, train=False), expected)
