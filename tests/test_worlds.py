"""The named synthetic worlds: the loader, the untouched presets, and what each nuisance does."""
import hashlib
from pathlib import Path

import numpy as np
import pytest

from hclafter.data import world, worlds

ROOT = Path(__file__).resolve().parents[1]


def _fingerprint(conditions: world.Conditions) -> str:
    h = hashlib.sha256()
    for im in world.generate(3, 32, 11, conditions):
        h.update(im.image.tobytes())
        h.update(np.float64(im.distribution).tobytes())
        h.update(f"{im.label},{im.secondary},{im.mix!r},{im.colour},{im.elements}".encode())
    return h.hexdigest()


def test_existing_presets_draw_the_same_images():
    # Computed at commit b34c139, before blur, noise and low light were added: the toy CLIP's
    # pre-training images (CLEAN) and the demo's dataset (WILD) must not change.
    assert _fingerprint(world.CLEAN) == "5e191c6ea96a38825dd2be884ed3e815af0ea08c126842944403dd7025fb2c5e"
    assert _fingerprint(world.WILD) == "ef4b0ba382eba599330fc5dca0e9b96046e947d6c90b5200ed13e95f8a013f48"
    assert worlds.load_world("clean") == world.CLEAN
    assert worlds.load_world("wild") == world.WILD


def test_every_world_is_documented_and_renders():
    names = worlds.available_worlds()
    assert {"clean", "colour_cast", "blur", "noise", "clutter", "low_light", "mixed"} <= set(names)
    assert worlds.DEFAULT_WORLD in names
    assert sorted(p.stem for p in (ROOT / "configs" / "worlds").glob("*.yaml")) == names
    for name in names:
        w = worlds.read_world(name)
        assert w.name == name and w.hurts in worlds.HURTS
        assert w.description.endswith(".") and ". " not in w.description  # one sentence
        assert len(w.why) > 80
        images = world.generate(1, 24, 0, w.conditions)
        assert len(images) == len(world.CLASSES)
        assert all(im.image.shape == (24, 24, 3) and im.image.dtype == np.uint8 for im in images)


def _pairs(name: str, n: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
    """The same scenes drawn clean and in world ``name``: each nuisance draws its random numbers
    after the scene, so one seed per image gives the same scene in both."""
    cond = worlds.load_world(name)
    return [tuple(world.sample_image(np.random.default_rng(k), k % 8, 32, c).image.astype(np.float64) / 255
                  for c in (world.CLEAN, cond)) for k in range(n)]


def _high_frequency(img: np.ndarray) -> float:
    return float(np.mean(np.diff(img, axis=0) ** 2) + np.mean(np.diff(img, axis=1) ** 2))


def _mean_colour(img: np.ndarray) -> np.ndarray:
    return img.mean(axis=(0, 1))


def test_blur_removes_fine_detail_and_keeps_colour():
    pairs = _pairs("blur")
    for clean, blurred in pairs:
        assert _high_frequency(blurred) < _high_frequency(clean)
        assert np.abs(_mean_colour(blurred) - _mean_colour(clean)).max() < 0.02
    # Smooth scenes keep the 1.5 % sensor noise added after the blur; over the set, most goes.
    assert sum(_high_frequency(b) for _, b in pairs) < 0.3 * sum(_high_frequency(c) for c, _ in pairs)


def test_noise_adds_fine_detail_and_keeps_colour():
    for clean, noisy in _pairs("noise"):
        assert _high_frequency(noisy) > _high_frequency(clean) + 0.01  # 2 x 0.1^2 = 0.02 expected
        assert np.abs(_mean_colour(noisy) - _mean_colour(clean)).max() < 0.03


def test_low_light_darkens_and_flattens():
    for clean, dark in _pairs("low_light"):
        assert dark.mean() < 0.5 * clean.mean()
        assert _high_frequency(dark) < _high_frequency(clean)


def test_colour_cast_moves_colour_and_keeps_texture():
    pairs = _pairs("colour_cast", 32)
    shift = [np.abs(_mean_colour(cast) - _mean_colour(clean)).max() for clean, cast in pairs]
    texture = [_high_frequency(cast) / _high_frequency(clean) for clean, cast in pairs]
    assert np.median(shift) > 0.05
    assert 0.5 < np.median(texture) < 2


def test_clutter_adds_shapes_of_another_emotion():
    for k in range(16):
        plain = world.sample_image(np.random.default_rng(k), k % 8, 32, world.CLEAN)
        cluttered = world.sample_image(np.random.default_rng(k), k % 8, 32, worlds.load_world("clutter"))
        assert len(cluttered.elements) > len(plain.elements)


def test_conditions_reject_out_of_range_values():
    with pytest.raises(ValueError, match="Conditions.noise"):
        world.Conditions(noise=-0.1)
    with pytest.raises(ValueError, match=r"Conditions.clutter must be in \[0, 1\], got 1.5"):
        world.Conditions(clutter=1.5)
    with pytest.raises(ValueError, match=r"Conditions.light must be in \(0, 4\]"):
        world.Conditions(light=0.0)
    # every nuisance has an upper bound: a blur of sd 1e6 pixels asked for 786 TiB, one of 1000 took minutes
    with pytest.raises(ValueError, match=r"Conditions.blur must be in \[0, 16\], got 1000000.0"):
        world.Conditions(blur=1.0e6)
    for name, (low, low_in, high) in world.BOUNDS.items():
        world.Conditions(**{name: high})
        with pytest.raises(ValueError, match=f"Conditions.{name} must be in"):
            world.Conditions(**{name: high * 1.001})
        with pytest.raises(ValueError, match=f"Conditions.{name} must be in"):
            world.Conditions(**{name: float("nan")})


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mine.yaml"
    path.write_text(text, encoding="utf-8")
    return path


GOOD = "description: Mine.\nwhy: Because.\nhurts: fine\nconditions:\n  blur: 0.5\n"


def test_loader_reads_a_world_file(tmp_path):
    path = _write(tmp_path, GOOD)
    assert worlds.load_world(path) == world.Conditions(blur=0.5)
    assert worlds.load_world(str(path)) == world.Conditions(blur=0.5)
    assert worlds.read_world(path).name == "mine"


def test_loader_lists_worlds_on_an_unknown_name():
    with pytest.raises(worlds.WorldError, match=r"unknown world 'sunny'; available: blur, clean, .*mixed"):
        worlds.load_world("sunny")
    with pytest.raises(worlds.WorldError, match="does not exist"):
        worlds.load_world("nowhere/world.yaml")


@pytest.mark.parametrize("text, message", [
    (GOOD + "seed: 3\n", r"mine.yaml: unknown key 'seed'; a world has description, why, hurts, conditions"),
    (GOOD + "  fog: 0.2\n", r"mine.yaml: unknown key 'conditions.fog'; Conditions has mix_rate, .*noise"),
    (GOOD.replace("hurts: fine", "hurts: colour"), r"mine.yaml: hurts must be one of none, global, fine, both"),
    (GOOD.replace("why: Because.\n", ""), r"mine.yaml: missing key 'why'"),
    (GOOD.replace("blur: 0.5", "blur: a lot"), r"mine.yaml: conditions.blur must be a finite number"),
    (GOOD.replace("blur: 0.5", "clutter: 2"), r"mine.yaml: Conditions.clutter must be in \[0, 1\], got 2"),
    (GOOD.replace("blur: 0.5", "blur: 1.0e6"), r"mine.yaml: conditions.blur: '1.0e6' is text to YAML, which reads an "
                                                r"exponent only with its sign; write 1.0e\+6"),
    ("- blur\n", r"mine.yaml: a world is a mapping"),
])
def test_loader_errors_name_the_file_and_key(tmp_path, text, message):
    with pytest.raises(worlds.WorldError, match=message):
        worlds.load_world(_write(tmp_path, text))


def _calibration_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("calibrate_worlds", ROOT / "scripts" / "calibrate_worlds.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_a_dose_scales_every_nuisance_and_keeps_the_class_signal():
    dosed = _calibration_script().dosed
    base = world.Conditions(mix_rate=0.7, cue_keep=0.9, clutter=0.5, colour_cast=0.1, exposure=0.2, light=0.5, gamma=1.5,
                      blur=1.0, noise=0.4)
    twice = dosed(base, 2.0)
    assert (twice.clutter, twice.colour_cast, twice.exposure, twice.blur) == pytest.approx((1.0, 0.2, 0.4, 2.0))
    assert twice.light == pytest.approx(0.25) and twice.gamma == pytest.approx(2.25)  # two stops; 1.5²
    assert twice.noise == pytest.approx(0.8) and (twice.mix_rate, twice.cue_keep, twice.swap) == (0.7, 0.9, 0.0)
    assert dosed(base, 4.0).clutter == 1.0 and dosed(base, 4.0).noise == 1.0  # clipped to their ranges
    assert dosed(world.Conditions(), 4.0) == world.Conditions()  # clean has nothing to dose


def test_the_calibrated_dose_is_the_smallest_within_the_band():
    choose = _calibration_script().choose
    fig = lambda probe, zeroshot=0.5: {"linear_probe": probe, "zeroshot": zeroshot}
    assert choose({0.5: fig(0.95), 1.0: fig(0.85), 2.0: fig(0.75)}) == 1.0  # 85 % is inside the band
    assert choose({0.5: fig(0.9), 1.0: fig(0.6)}) is None  # jumped below 70 %: no calibrated world
    assert choose({0.5: fig(0.9), 1.0: fig(0.8, zeroshot=0.2)}) is None  # the text side no longer reads the images
    assert choose({0.5: fig(0.9), 1.0: fig(0.88)}) is None  # never inside the band
