"""A synthetic emotion world: seeded images whose Mikels-8 emotion is carried by visual cues.

Every emotion owns one family of cues, on two scales:

* **global** ones: the colour (hue, saturation, brightness) and the layout of a simple scene;
* **fine** ones: a 1-2 pixel texture (stars, rain streaks, film grain, mottled stains, polka
  dots, ...), which intermediate ViT blocks carry next to the final CLS token's global view (in
  the demo, HybridCascade-LaFTer's middle stage scores above its last one).

| emotion | colour | scene and shapes | fine texture |
|---|---|---|---|
| amusement | bright, vivid yellow / pink | colourful round balloons | polka dots |
| contentment | soft pastel green under a pale sky | a gentle horizon, a blurred sun, a cloud | none (smooth) |
| awe | deep blue night | one towering snowy mountain peak | countless tiny stars |
| excitement | blazing red-orange, full saturation | rays bursting from a point, confetti streaks | none |
| fear | near-black violet, vignette | sharp thorns, two glowing eyes | film grain |
| sadness | dull grey-blue, low contrast | a small lonely figure, empty space | thin rain streaks |
| disgust | murky olive / brown | shapeless oozing blobs | mottled mouldy stains |
| anger | deep red against black, hard contrast | zigzag cracks, sharp shards | none |

Images are ambiguous between wheel neighbours, as real vote data is: an image of emotion ``y``
may take a share ``m`` (up to 0.45) of a neighbour ``s = y ± 1``. Its colour is blended by ``m``
and the neighbour's shapes are drawn faintly; its vote distribution is simulated annotator votes
around ``(1-m)·y + m·s`` (plus a little wheel-shaped spread), so the label always has the most
votes. :class:`Conditions` say how an image is "photographed": ``CLEAN`` for the captioned
pre-training images of the toy CLIP, ``WILD`` (colour casts, exposure changes, unrelated clutter,
more neighbour mixing) for the emotion datasets it is evaluated and tuned on; the named worlds
(:mod:`hclafter.worlds`) add blur, sensor noise and low light, each documented with the cue it
hurts. Captions (:func:`caption`) describe what was drawn and the evoked emotion in varied wording.

Nothing here resembles real photographs; it exists so that a small CLIP can be trained to
align images and text within minutes (``scripts/train_toy_clip.py``).
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..core.emotions import MIKELS8, strategy1

CLASSES = MIKELS8.classes
VOTES = 20  # simulated annotators per image
MAX_MIX = 0.45  # the neighbour's largest share, so the label keeps the majority


@dataclass(frozen=True)
class Style:
    """The global look of a class: main hue, saturation and brightness in [0, 1]."""

    hue: float
    sat: float
    val: float


STYLES: dict[str, Style] = {
    "amusement": Style(0.13, 0.75, 0.95),
    "contentment": Style(0.32, 0.35, 0.80),
    "awe": Style(0.64, 0.70, 0.45),
    "excitement": Style(0.03, 0.95, 0.95),
    "fear": Style(0.75, 0.40, 0.16),
    "sadness": Style(0.59, 0.18, 0.50),
    "disgust": Style(0.19, 0.60, 0.40),
    "anger": Style(0.99, 0.90, 0.45),
}

# Emotion words for captions: the class name itself, other nouns, adjectives.
NOUNS: dict[str, list[str]] = {
    "amusement": ["amusement", "fun", "playfulness", "humour", "merriment"],
    "contentment": ["contentment", "calm", "peace", "serenity", "ease"],
    "awe": ["awe", "wonder", "grandeur", "majesty", "reverence"],
    "excitement": ["excitement", "thrill", "energy", "exhilaration", "elation"],
    "fear": ["fear", "terror", "dread", "horror", "fright"],
    "sadness": ["sadness", "sorrow", "melancholy", "grief", "loneliness"],
    "disgust": ["disgust", "revulsion", "nausea", "repulsion", "loathing"],
    "anger": ["anger", "rage", "fury", "hostility", "wrath"],
}
ADJECTIVES: dict[str, list[str]] = {
    "amusement": ["amusing", "funny", "playful", "cheerful", "silly"],
    "contentment": ["content", "peaceful", "calm", "serene", "relaxing"],
    "awe": ["awe-inspiring", "majestic", "grand", "sublime", "breathtaking"],
    "excitement": ["exciting", "thrilling", "energetic", "wild", "exhilarating"],
    "fear": ["frightening", "scary", "terrifying", "eerie", "creepy"],
    "sadness": ["sad", "melancholy", "sorrowful", "lonely", "mournful"],
    "disgust": ["disgusting", "gross", "revolting", "repulsive", "nauseating"],
    "anger": ["angry", "furious", "hostile", "aggressive", "enraged"],
}


@dataclass
class WorldImage:
    image: np.ndarray  # [H, W, 3] uint8
    label: int  # index in MIKELS8.classes (the majority of the votes)
    secondary: int  # the wheel neighbour it shares cues with
    mix: float  # the neighbour's share in [0, MAX_MIX]
    distribution: np.ndarray  # [8] vote fractions, summing to 1
    colour: str  # a phrase for the rendered global colour
    elements: list[list[str]] = field(default_factory=list)  # per drawn element: alternative phrases


# --- drawing primitives (coordinates in [0, 1], y downwards) ---------------------------------


class Canvas:
    def __init__(self, size: int) -> None:
        self.size = size
        grid = (np.mgrid[0:size, 0:size].astype(np.float64) + 0.5) / size
        self.y, self.x = grid[0], grid[1]
        self.px = 1.0 / size  # one pixel
        self.rgb = np.zeros((size, size, 3))
        self.elements: list[list[str]] = []

    def paint(self, mask: np.ndarray, colour, alpha: float = 1.0) -> None:
        a = np.clip(mask, 0, 1)[..., None] * alpha
        self.rgb = self.rgb * (1 - a) + np.asarray(colour, dtype=np.float64) * a

    def circle(self, cx: float, cy: float, r: float, soft: float = 1.0) -> np.ndarray:
        """Anti-aliased disc; ``soft`` is the edge width in pixels."""
        d = np.hypot(self.x - cx, self.y - cy)
        return np.clip((r - d) / (soft * self.px) + 0.5, 0, 1)

    def segment(self, x0: float, y0: float, x1: float, y1: float, width: float) -> np.ndarray:
        """Anti-aliased line of ``width`` pixels."""
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((self.x - x0) * dx + (self.y - y0) * dy) / max(dx * dx + dy * dy, 1e-12), 0, 1)
        d = np.hypot(self.x - (x0 + t * dx), self.y - (y0 + t * dy))
        return np.clip((width * self.px / 2 - d) / self.px + 0.5, 0, 1)

    def triangle(self, pts) -> np.ndarray:
        (ax, ay), (bx, by), (cx, cy) = pts

        def side(px, py, qx, qy):
            return (self.x - qx) * (py - qy) - (px - qx) * (self.y - qy)

        d1, d2, d3 = side(ax, ay, bx, by), side(bx, by, cx, cy), side(cx, cy, ax, ay)
        neg = (d1 < 0) | (d2 < 0) | (d3 < 0)
        pos = (d1 > 0) | (d2 > 0) | (d3 > 0)
        return (~(neg & pos)).astype(np.float64)


def hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))))


def gradient(c: Canvas, top, bottom) -> None:
    t = c.y[..., None]
    c.rgb = np.asarray(top) * (1 - t) + np.asarray(bottom) * t


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


# --- one family of cues per emotion: a background (global look) and elements (shapes) ---------
# Backgrounds take the blended style; elements take an opacity, so a neighbour's shapes can be
# drawn faintly on top of the main class's scene.


def bg_amusement(c: Canvas, st: Style, rng: np.random.Generator) -> None:
    gradient(c, hsv(st.hue, st.sat * 0.55, st.val), hsv(st.hue + 0.04, st.sat * 0.8, st.val * 0.95))
    if rng.random() < 0.7:  # polka dots: a fine regular texture
        p = int(rng.integers(3, 6))
        off = rng.integers(0, p, size=2)
        yi, xi = np.mgrid[0:c.size, 0:c.size]
        dots = (((yi + off[0]) % p == 0) & ((xi + off[1]) % p == 0)).astype(np.float64)
        c.paint(dots, hsv(st.hue + 0.5, 0.5, 1.0), 0.55)
        c.elements.append(["polka dots", "a dotted pattern", "tiny playful dots"])


def el_amusement(c: Canvas, st: Style, rng: np.random.Generator, alpha: float) -> None:
    n = int(rng.integers(3, 7)) if alpha >= 1 else int(rng.integers(1, 3))
    for _ in range(n):
        r = rng.uniform(0.06, 0.14)
        cx, cy = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.85)
        colour = hsv(_pick(rng, [0.92, 0.5, 0.14, 0.08, 0.8, 0.33]), 0.75, 1.0)
        c.paint(c.circle(cx, cy, r), colour, alpha)
        c.paint(c.circle(cx - r * 0.35, cy - r * 0.35, r * 0.25), (1, 1, 1), 0.6 * alpha)  # shine
        c.paint(c.segment(cx, cy + r, cx + rng.uniform(-0.05, 0.05), min(cy + r + 0.15, 1.0), 1.0), (0.3, 0.3, 0.3),
                0.5 * alpha)
    c.elements.append(["colourful round balloons", "bouncy balloons", "round bubbles in many colours",
                       "floating balloons"])


def bg_contentment(c: Canvas, st: Style, rng: np.random.Generator) -> None:
    sky_top, sky_low = hsv(0.56, 0.35, 0.95), hsv(0.55, 0.15, 1.0)
    gradient(c, sky_top, sky_low)
    horizon = rng.uniform(0.55, 0.72) + 0.03 * np.sin(2 * np.pi * (c.x * rng.uniform(0.5, 1.2) + rng.uniform()))
    ground = np.clip((c.y - horizon) / (2 * c.px) + 0.5, 0, 1)
    c.paint(ground, hsv(st.hue, st.sat, st.val * 0.9))
    c.paint(ground * (c.y - horizon).clip(0, 1) * 2.5, hsv(st.hue + 0.03, st.sat, st.val * 0.75))
    c.elements.append(["a calm green meadow under a pale sky", "a gentle horizon", "soft rolling hills",
                       "a quiet meadow"])


def el_contentment(c: Canvas, st: Style, rng: np.random.Generator, alpha: float) -> None:
    cx, cy = rng.uniform(0.2, 0.8), rng.uniform(0.12, 0.35)
    c.paint(c.circle(cx, cy, rng.uniform(0.08, 0.13), soft=4.0), hsv(0.13, 0.35, 1.0), alpha)
    items = [["a soft warm sun", "a hazy sun", "a glowing pale sun"]]
    if rng.random() < 0.6:
        cx2, cy2 = rng.uniform(0.15, 0.85), rng.uniform(0.1, 0.3)
        for k in range(3):
            c.paint(c.circle(cx2 + (k - 1) * 0.07, cy2 + (0.02 if k != 1 else 0), 0.06, soft=3.0), (1, 1, 1),
                    0.85 * alpha)
        items.append(["a fluffy white cloud", "a small soft cloud"])
    c.elements += items


def bg_awe(c: Canvas, st: Style, rng: np.random.Generator) -> None:
    gradient(c, hsv(st.hue, st.sat, st.val * 0.45), hsv(st.hue - 0.03, st.sat * 0.8, st.val * 1.1))
    stars = (rng.random((c.size, c.size)) < rng.uniform(0.03, 0.06)) * (c.y < 0.75)
    c.paint(stars * rng.uniform(0.6, 1.0, stars.shape), (1, 1, 0.92))
    c.elements.append(["countless tiny stars", "a sky full of stars", "a starry night sky", "glittering stars"])


def el_awe(c: Canvas, st: Style, rng: np.random.Generator, alpha: float) -> None:
    px, py = rng.uniform(0.3, 0.7), rng.uniform(0.08, 0.25) if alpha >= 1 else rng.uniform(0.35, 0.55)
    half = rng.uniform(0.45, 0.7) * (1 - py)
    mountain = c.triangle([(px, py), (px - half, 1.05), (px + half, 1.05)])
    c.paint(mountain, hsv(st.hue + 0.02, st.sat * 0.5, min(1.0, st.val * 1.1 + 0.15)), alpha)
    snow = mountain * (c.y < py + 0.13)
    c.paint(snow, (0.95, 0.95, 1.0), alpha)
    c.elements.append(["a towering snowy mountain", "an immense mountain peak", "a huge peak with a snowy summit",
                       "a vast mountain"])


def bg_excitement(c: Canvas, st: Style, rng: np.random.Generator) -> None:
    cx, cy = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)
    k = int(rng.integers(7, 13))
    theta = np.arctan2(c.y - cy, c.x - cx)
    rays = (np.sin(k * theta + rng.uniform(0, 2 * np.pi)) > 0).astype(np.float64)
    c.rgb[:] = hsv(st.hue, st.sat, st.val)
    c.paint(rays, hsv(st.hue + 0.1, st.sat, st.val))
    c.paint(c.circle(cx, cy, 0.08), hsv(st.hue + 0.14, st.sat * 0.6, 1.0))
    c.elements.append(["rays bursting from the centre", "a blazing sunburst", "an explosion of light rays",
                       "radiating beams"])


def el_excitement(c: Canvas, st: Style, rng: np.random.Generator, alpha: float) -> None:
    n = int(rng.integers(6, 13)) if alpha >= 1 else int(rng.integers(2, 5))
    for _ in range(n):
        x0, y0 = rng.uniform(0, 1), rng.uniform(0, 1)
        length = rng.uniform(0.08, 0.2)
        c.paint(c.segment(x0, y0, x0 + length, y0 - length * rng.uniform(0.3, 1.0), 2.0),
                hsv(_pick(rng, [0.85, 0.5, 0.15, 0.3]), 0.9, 1.0), alpha)
    c.elements.append(["flying confetti", "streaks of confetti", "zooming speed streaks", "bright flying sparks"])


def bg_fear(c: Canvas, st: Style, rng: np.random.Generator) -> None:
    cx, cy = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65)
    vignette = np.clip(1 - 1.6 * ((c.x - cx) ** 2 + (c.y - cy) ** 2), 0.1, 1)
    c.rgb = hsv(st.hue, st.sat, st.val * 1.6)[None, None, :] * vignette[..., None]
    c.rgb += rng.normal(0, 0.07, (c.size, c.size, 1))  # film grain
    c.elements.append(["deep grainy shadows", "a grainy darkness", "black shadows closing in", "a dark vignette"])


def el_fear(c: Canvas, st: Style, rng: np.random.Generator, alpha: float) -> None:
    n = int(rng.integers(4, 9)) if alpha >= 1 else int(rng.integers(1, 4))
    for _ in range(n):
        bx, h, w = rng.uniform(0, 1), rng.uniform(0.25, 0.6), rng.uniform(0.02, 0.05)
        c.paint(c.triangle([(bx + rng.uniform(-0.1, 0.1), 1 - h), (bx - w, 1.02), (bx + w, 1.02)]), (0.02, 0.0, 0.04),
                alpha)
    ex, ey = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.6)
    eye = hsv(_pick(rng, [0.15, 0.0, 0.3]), 0.9, 1.0)
    gap = rng.uniform(0.05, 0.08)
    c.paint(np.maximum(c.circle(ex - gap / 2, ey, 1.3 * c.px), c.circle(ex + gap / 2, ey, 1.3 * c.px)), eye, alpha)
    c.elements += [["sharp black thorns", "jagged spikes", "thorny claws"],
                   ["two glowing eyes", "eyes staring from the dark", "a pair of glowing eyes"]]


def bg_sadness(c: Canvas, st: Style, rng: np.random.Generator) -> None:
    gradient(c, hsv(st.hue, st.sat, st.val * 1.05), hsv(st.hue + 0.02, st.sat * 0.8, st.val * 0.8))
    c.elements.append(["a dull grey sky", "an empty grey expanse", "a washed-out grey scene"])


def el_sadness(c: Canvas, st: Style, rng: np.random.Generator, alpha: float) -> None:
    n = int(rng.integers(18, 36)) if alpha >= 1 else int(rng.integers(6, 12))
    slant = rng.uniform(-0.08, 0.08)
    for _ in range(n):
        x0, y0, length = rng.uniform(0, 1), rng.uniform(-0.1, 1), rng.uniform(0.08, 0.22)
        c.paint(c.segment(x0, y0, x0 + slant * length, y0 + length, 0.8), (0.85, 0.88, 0.95), 0.55 * alpha)
    fx, fy = rng.uniform(0.2, 0.8), rng.uniform(0.75, 0.88)
    figure = np.maximum(c.circle(fx, fy - 0.08, 0.025), c.segment(fx, fy - 0.06, fx, fy + 0.05, 3.0))
    c.paint(figure, (0.12, 0.13, 0.16), alpha)
    c.elements += [["thin streaks of falling rain", "a steady drizzle", "rain falling", "rain streaks"],
                   ["a small lonely figure", "a lone person far away", "a solitary figure"]]


def bg_disgust(c: Canvas, st: Style, rng: np.random.Generator) -> None:
    c.rgb[:] = hsv(st.hue, st.sat, st.val)
    coarse = rng.random((c.size // 2 + 1, c.size // 2 + 1)).repeat(2, 0).repeat(2, 1)[:c.size, :c.size]
    fine = rng.random((c.size, c.size))
    stains = 0.6 * coarse + 0.4 * fine
    c.paint(stains > 0.62, hsv(st.hue + 0.07, st.sat, st.val * 0.85), 0.9)
    c.paint(stains < 0.3, hsv(st.hue - 0.1, st.sat * 0.8, st.val * 0.55), 0.9)
    c.elements.append(["mottled mouldy stains", "blotchy rotten patches", "a mouldy, stained surface", "slimy spots"])


def el_disgust(c: Canvas, st: Style, rng: np.random.Generator, alpha: float) -> None:
    n = int(rng.integers(2, 4)) if alpha >= 1 else 1
    for _ in range(n):
        cx, cy = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)
        blob = np.zeros((c.size, c.size))
        for _ in range(5):
            blob = np.maximum(blob, c.circle(cx + rng.normal(0, 0.06), cy + rng.normal(0, 0.06), rng.uniform(0.04, 0.09)))
        colour = hsv(0.2 + rng.uniform(-0.03, 0.05), 0.75, 0.55)
        c.paint(blob, colour, alpha)
        c.paint(c.segment(cx, cy, cx + rng.normal(0, 0.02), cy + rng.uniform(0.15, 0.3), 2.0), colour, alpha)
    c.elements.append(["shapeless oozing blobs", "dripping slime", "a slimy blob", "oozing sludge"])


def bg_anger(c: Canvas, st: Style, rng: np.random.Generator) -> None:
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + (np.cos(angle) * (c.x - 0.5) + np.sin(angle) * (c.y - 0.5)) * 1.5, 0, 1)[..., None]
    c.rgb = hsv(st.hue, st.sat, st.val * 1.6) * (1 - t) + np.array([0.03, 0.0, 0.0]) * t
    c.elements.append(["a deep red glare against black", "harsh red and black", "blood red darkness"])


def el_anger(c: Canvas, st: Style, rng: np.random.Generator, alpha: float) -> None:
    for _ in range(int(rng.integers(1, 3))):
        x, y = rng.uniform(0, 0.2), rng.uniform(0.1, 0.9)
        colour = hsv(_pick(rng, [0.0, 0.06, 0.12]), 0.9, 1.0)
        while x < 1.0:
            nx, ny = x + rng.uniform(0.12, 0.25), np.clip(y + rng.choice([-1, 1]) * rng.uniform(0.1, 0.3), 0, 1)
            c.paint(c.segment(x, y, nx, ny, 2.2), colour, alpha)
            x, y = nx, ny
    n = int(rng.integers(3, 7)) if alpha >= 1 else int(rng.integers(1, 3))
    for _ in range(n):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.12)
        a = rng.uniform(0, 2 * np.pi, 3)
        c.paint(c.triangle([(cx + r * np.cos(t), cy + r * np.sin(t)) for t in a]), (0.45, 0.0, 0.02), alpha)
    c.elements += [["jagged zigzag cracks", "a zigzag bolt", "violent cracks"],
                   ["sharp broken shards", "angular red shards", "shattered fragments"]]


Painter = Callable[..., None]
BACKGROUNDS: dict[str, Painter] = {
    "amusement": bg_amusement, "contentment": bg_contentment, "awe": bg_awe, "excitement": bg_excitement,
    "fear": bg_fear, "sadness": bg_sadness, "disgust": bg_disgust, "anger": bg_anger}
ELEMENTS: dict[str, Painter] = {
    "amusement": el_amusement, "contentment": el_contentment, "awe": el_awe, "excitement": el_excitement,
    "fear": el_fear, "sadness": el_sadness, "disgust": el_disgust, "anger": el_anger}


def _blend_style(a: Style, b: Style, m: float) -> Style:
    dh = ((b.hue - a.hue + 0.5) % 1.0) - 0.5  # the short way round the hue circle
    return Style((a.hue + m * dh) % 1.0, a.sat + m * (b.sat - a.sat), a.val + m * (b.val - a.val))


def _jitter(st: Style, rng: np.random.Generator) -> Style:
    return Style((st.hue + rng.normal(0, 0.02)) % 1.0, float(np.clip(st.sat + rng.normal(0, 0.06), 0.05, 1)),
                 float(np.clip(st.val + rng.normal(0, 0.06), 0.08, 1)))


def colour_phrase(rgb: np.ndarray) -> str:
    """Words for an image's mean colour: brightness, saturation, hue name."""
    h, s, v = colorsys.rgb_to_hsv(*np.clip(rgb, 0, 1))
    light = "very dark" if v < 0.22 else "dark" if v < 0.42 else "dim" if v < 0.6 else "bright" if v > 0.82 else ""
    if s < 0.18:
        return " ".join(w for w in (light, "grey") if w)
    sat = "pale" if s < 0.4 else "vivid" if s > 0.75 else ""
    names = [(0.04, "red"), (0.09, "orange"), (0.17, "yellow"), (0.24, "olive"), (0.45, "green"), (0.53, "teal"),
             (0.7, "blue"), (0.8, "violet"), (0.93, "pink"), (1.01, "red")]
    hue = next(n for limit, n in names if h < limit)
    return " ".join(w for w in (light, sat, hue) if w)


def vote_distribution(label: int, secondary: int, mix: float, rng: np.random.Generator) -> np.ndarray:
    """Simulated votes around (1-m)·label + m·secondary; the label keeps the most votes."""
    target = np.zeros(len(CLASSES))
    target[label] += 1 - mix
    target[secondary] += mix
    target = 0.85 * target + 0.15 * strategy1(MIKELS8, label, sigma=0.8, epsilon=0.05)
    counts = rng.multinomial(VOTES, target)
    if counts.argmax() != label or (counts == counts[label]).sum() > 1:
        counts[label] = counts.max() + 1
    return counts / counts.sum()


@dataclass(frozen=True)
class Conditions:
    """How an image is "photographed": the nuisances that separate a dataset from clean examples.

    ``CLEAN`` images show their emotion's cues plainly. ``WILD`` ones (the demo's emotion dataset
    so far) carry faint shapes of an unrelated emotion, a colour cast and an exposure change, and
    lean on a wheel neighbour more often. A colour cast hits the global colour cue but leaves the
    fine textures intact; blur and noise hit the fine textures; low light (``light``, ``gamma``)
    hits both. The named worlds (:mod:`hclafter.worlds`) say which preset changes what and why.
    """

    mix_rate: float = 0.65  # probability that an image shares cues with a wheel neighbour
    swap: float = 0.0  # probability that a strongly mixed image takes the neighbour's background
    cue_keep: float = 1.0  # probability that the emotion's shapes are drawn
    clutter: float = 0.0  # probability of faint shapes of an unrelated emotion
    colour_cast: float = 0.0  # standard deviation of a global hue rotation, in turns
    exposure: float = 0.0  # standard deviation of the log contrast change
    light: float = 1.0  # share of the light reaching the camera (0.5: one stop under)
    gamma: float = 1.0  # exponent on intensities before dimming; above 1 it crushes the shadows
    blur: float = 0.0  # standard deviation of a Gaussian lens blur, in pixels
    noise: float = 0.0  # standard deviation of per-pixel, per-channel sensor noise (on [0, 1] values)

    def __post_init__(self) -> None:
        for name, (low, low_in, high) in BOUNDS.items():
            value = getattr(self, name)
            if not (low <= value if low_in else low < value) or not value <= high:
                raise ValueError(f"Conditions.{name} must be in {'[' if low_in else '('}{low}, {high}], got {value}")


# Each field's range (lowest, whether it is allowed, highest): beyond them an image says nothing more
# (a hue rotation of sd 1 turn is already uniform; noise of sd 1 drowns [0, 1] values) and the cost
# grows without bound (a blur of sd 1e6 pixels asked NumPy for 786 TiB).
BOUNDS: dict[str, tuple[float, bool, float]] = {
    "mix_rate": (0, True, 1), "swap": (0, True, 1), "cue_keep": (0, True, 1), "clutter": (0, True, 1),
    "colour_cast": (0, True, 1), "exposure": (0, True, 3), "light": (0, False, 4), "gamma": (0, False, 8),
    "blur": (0, True, 16), "noise": (0, True, 1),
}


CLEAN = Conditions()
WILD = Conditions(mix_rate=0.8, clutter=0.5, colour_cast=0.15, exposure=0.3)


def _hue_rotate(rgb: np.ndarray, turns: float) -> np.ndarray:
    """Rotate every colour about the grey axis (brightness and saturation roughly kept)."""
    a = 2 * np.pi * turns
    cos, sin = np.cos(a), np.sin(a)
    k = np.ones((3, 3)) / 3
    skew = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]]) / np.sqrt(3)
    m = cos * np.eye(3) + (1 - cos) * k + sin * skew
    return rgb @ m.T


def _gaussian_blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an [H, W, 3] image, ``sigma`` in pixels, mirrored at the borders."""
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    h, w = rgb.shape[:2]
    padded = np.pad(rgb, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    rows = sum(t * padded[i:i + h] for i, t in enumerate(taps))
    return sum(t * rows[:, i:i + w] for i, t in enumerate(taps))


def sample_image(rng: np.random.Generator, label: int, size: int, conditions: Conditions = CLEAN) -> WorldImage:
    """One image of emotion ``label`` (an index into :data:`CLASSES`), ``size`` pixels square."""
    n = len(CLASSES)
    cond = conditions
    secondary = (label + (1 if rng.random() < 0.5 else -1)) % n
    mix = float(min(MAX_MIX, rng.beta(2.0, 3.0) * 0.8)) if rng.random() < cond.mix_rate else 0.0
    name, other = CLASSES[label], CLASSES[secondary]
    style = _jitter(_blend_style(STYLES[name], STYLES[other], mix), rng)
    canvas = Canvas(size)
    scene = other if mix > 0.25 and rng.random() < cond.swap else name
    BACKGROUNDS[scene](canvas, style, rng)
    if rng.random() < cond.cue_keep or scene != name:
        ELEMENTS[name](canvas, style, rng, 1.0)
    if mix > 0.12 or scene != name:  # the neighbour's shapes, faintly
        ELEMENTS[other](canvas, _jitter(STYLES[other], rng), rng, min(1.0, 1.6 * mix))
    if rng.random() < cond.clutter:
        far = int((label + rng.integers(2, n - 1)) % n)
        ELEMENTS[CLASSES[far]](canvas, _jitter(STYLES[CLASSES[far]], rng), rng, rng.uniform(0.3, 0.7))
    if rng.random() < 0.5:
        canvas.rgb = canvas.rgb[:, ::-1]
    rgb = canvas.rgb
    if cond.colour_cast > 0:
        rgb = _hue_rotate(rgb, rng.normal(0, cond.colour_cast))
    if cond.exposure > 0:
        rgb = (rgb - 0.5) * np.exp(rng.normal(0, cond.exposure)) + 0.5 + rng.normal(0, cond.exposure / 3)
    # Then the camera: dim light (tone curve, then the light level), lens blur, sensor noise. Off,
    # they draw no random numbers, so the presets above keep their images.
    if cond.light != 1 or cond.gamma != 1:
        rgb = cond.light * np.clip(rgb, 0, 1) ** cond.gamma
    if cond.blur > 0:
        rgb = _gaussian_blur(rgb, cond.blur)
    if cond.noise > 0:
        rgb = rgb + rng.normal(0, cond.noise, rgb.shape)
    rgb = np.clip(rgb + rng.normal(0, 0.015, rgb.shape), 0, 1)
    return WorldImage((rgb * 255 + 0.5).astype(np.uint8), label, secondary, mix,
                      vote_distribution(label, secondary, mix, rng), colour_phrase(rgb.mean(axis=(0, 1))),
                      canvas.elements)


def generate(per_class: int, size: int, seed: int | np.random.SeedSequence,
             conditions: Conditions = CLEAN) -> list[WorldImage]:
    """``per_class`` images of every emotion, class by class; the same seed gives the same images."""
    rng = np.random.default_rng(seed)
    return [sample_image(rng, label, size, conditions) for label in range(len(CLASSES)) for _ in range(per_class)]


# --- captions --------------------------------------------------------------------------------

_MEDIA = ["photo", "picture", "image", "painting", "scene", "illustration", "snapshot", "view"]
# Emotion-only frames, some of them shaped like the shipped zero-shot templates.
_FRAMES = ["{a} {m} that evokes {e}.", "{a} {m} full of {e}.", "{a} {m} conveying {e}.",
           "{a} {m} that expresses {e}.", "{a} {m} that makes the viewer feel {e}.",
           "the feeling of {e} in a single {m}.", "{a} {m} of pure {e}.", "a visual depiction of {e}.",
           "{a} {m} whose overall mood is {e}.", "{e}.", "{a} {m} radiating {e}.", "{a} {m} that stirs {e}."]
_VERBS = ["evoking", "conveying", "expressing", "full of", "radiating", "suggesting", "filled with"]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _emotion_noun(rng: np.random.Generator, label: int) -> str:
    name = CLASSES[label]
    return name if rng.random() < 0.5 else _pick(rng, NOUNS[name])


def caption(img: WorldImage, rng: np.random.Generator) -> str:
    """A caption of the image: what is drawn and/or the evoked emotion, in varied wording."""
    parts = [_pick(rng, e) for e in img.elements]
    rng.shuffle(parts)
    parts = parts[: int(rng.integers(1, len(parts) + 1))]
    content = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    medium = _pick(rng, _MEDIA)
    emotion = _emotion_noun(rng, img.label)
    if img.mix > 0.25 and rng.random() < 0.5:
        emotion += f" with a touch of {_emotion_noun(rng, img.secondary)}"
    colour = img.colour
    form = rng.random()
    if form < 0.40:
        lead = f"{colour} {medium}" if rng.random() < 0.7 else medium
        return f"{_article(lead)} {lead} with {content}, {_pick(rng, _VERBS)} {emotion}."
    if form < 0.62:
        return _pick(rng, _FRAMES).format(a=_article(medium), m=medium, e=emotion)
    if form < 0.77:
        return f"{content}." if rng.random() < 0.5 else f"{_article(colour)} {colour} {medium} with {content}."
    if form < 0.9:
        adj = _pick(rng, ADJECTIVES[CLASSES[img.label]])
        return f"{_article(adj)} {adj} {medium}: {content}."
    return f"{content}; it feels like {emotion}."


def captions(images: list[WorldImage], per_image: int, seed: int | np.random.SeedSequence) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [[caption(img, rng) for _ in range(per_image)] for img in images]
