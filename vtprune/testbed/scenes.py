"""Scene specs, a seeded scene sampler and a deterministic PIL renderer for the synthetic VQA testbed.

A scene is pure data: objects, clutter and background in *normalised* coordinates (fractions of the
image side), so one spec renders at any square size (168 px for LLaVA, 224 px for Qwen2-VL, ...).
Rendering uses only integer numpy arithmetic and PIL drawing primitives (no fonts, no trigonometry), so the
same spec gives identical pixels for fixed numpy and Pillow versions; the dataset module checks this with a
stored pixel hash.

Design choices (lessons of the feasibility study, docs/testbed.md in the shared folder):

* low object coverage: 3-8 objects, small ones are 8-11 px and large ones 22-38 px at the 168-px
  reference size (the study's relative sizes), so most of the image is background and clutter;
* every object lies entirely inside one image quadrant, at least 2 reference px from the midlines, so
  position answers are never ambiguous;
* a small object lies inside one cell of the 12x12 reference grid (one 14-px patch at 168 px);
* objects never overlap (a gap of at least 2 reference px), and clutter is grey, so it belongs to no answer.

Measured on ``make_eval_set(0, 300)``: 5.4 objects per scene, half of them small; objects cover 6.4 % of the
pixels on average, and 16 % of the 12x12 tokens at 168 px touch an object (the study's 112-px scenes: 31.7 % of
8x8 tokens). A first version with 4-10 objects and large ones of 15-26 px (4.6 % of the pixels) left the LLaVA
testbed unable to find objects by shape within the training budget (64 % held-out).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

REF_SIZE = 168  # reference image side in pixels: sizes below are stated at this size
REF_GRID = 12  # a small object fits inside one cell of this grid (168 px / patch 14)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
QUADRANTS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")

COLOUR_JITTER = 15  # per channel, uniform in [-15, 15]
SMALL_PX = (8, 11)  # side range of small objects at the reference size
LARGE_PX = (22, 38)  # side range of large objects at the reference size
P_SMALL = 0.5
N_OBJECTS = (3, 8)
N_CLUTTER = (6, 14)
GAP_PX = 2  # minimum gap between objects, and between an object and a quadrant midline
NOISE = 14  # background pixel noise, uniform integers in [-14, 14] (sigma about 8)
MAX_TRIES = 60

Box = tuple[float, float, float, float]  # normalised (x0, y0, x1, y1)
Forbid = Callable[[str, str, bool], bool]  # (colour, shape, small) -> True if a distractor may not have it


@dataclass(frozen=True)
class Obj:
    """One answerable object: a filled shape whose bounding square has side ``size`` around (cx, cy)."""

    colour: str
    shape: str
    rgb: tuple[int, int, int]
    cx: float
    cy: float
    size: float

    @property
    def small(self) -> bool:
        """Small objects fit inside one reference patch; questions may single them out."""
        return self.size * REF_SIZE <= SMALL_PX[1] + 0.5

    @property
    def box(self) -> Box:
        """Normalised bounding box."""
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)

    @property
    def quadrant(self) -> str:
        """One of QUADRANTS; unambiguous because every object lies inside one quadrant."""
        return ("top" if self.cy < 0.5 else "bottom") + "-" + ("left" if self.cx < 0.5 else "right")


@dataclass(frozen=True)
class Clutter:
    """A grey line segment (or, when very short, a speck) that belongs to no answer."""

    x0: float
    y0: float
    x1: float
    y1: float
    width: float  # in reference pixels
    grey: int


@dataclass(frozen=True)
class Background:
    """A linear gradient from ``rgb0`` to ``rgb1`` along the integer direction (dx, dy), plus noise."""

    rgb0: tuple[int, int, int]
    rgb1: tuple[int, int, int]
    dx: int
    dy: int
    noise_seed: int


@dataclass(frozen=True)
class Scene:
    """A full scene spec; object indices are the ids that questions refer to as targets."""

    objects: tuple[Obj, ...]
    clutter: tuple[Clutter, ...]
    background: Background

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        return {
            "objects": [_fields(o) for o in self.objects],
            "clutter": [_fields(c) for c in self.clutter],
            "background": _fields(self.background),
        }

    @staticmethod
    def from_dict(d: dict) -> Scene:
        """Inverse of to_dict."""
        objects = tuple(Obj(**{**o, "rgb": tuple(o["rgb"])}) for o in d["objects"])
        b = d["background"]
        background = Background(**{**b, "rgb0": tuple(b["rgb0"]), "rgb1": tuple(b["rgb1"])})
        return Scene(objects, tuple(Clutter(**c) for c in d["clutter"]), background)


@dataclass(frozen=True)
class Request:
    """An object a question needs in the scene; None fields are sampled freely."""

    colour: str | None = None
    shape: str | None = None
    small: bool | None = None
    quadrant: str | None = None


def _fields(x: object) -> dict:
    """A frozen dataclass as a plain dict, tuples turned into lists for JSON."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(x).items()}


# ---------------------------------------------------------------------------------------------- sampling


def sample_scene(rng: np.random.Generator, requests: tuple[Request, ...] = (), forbid: Forbid | None = None
                 ) -> Scene | None:
    """A random scene containing the requested objects; other objects never match ``forbid``.

    Returns None when placement fails (the caller retries with the same generator). Object order is shuffled
    so that a question's target is not always object 0."""
    n = max(int(rng.integers(N_OBJECTS[0], N_OBJECTS[1] + 1)), len(requests) + 1)
    wanted = [_sized(rng, r) for r in requests]
    for k in range(len(requests), n):
        need_small = k == n - 1 and not any(r.small for r in wanted)  # at least one small object per scene
        wanted.append(_distractor(rng, forbid, True if need_small else None))
    objects: list[Obj] = []
    for req in wanted:
        obj = _place(rng, req, objects)
        if obj is None:
            return None
        objects.append(obj)
    order = rng.permutation(len(objects))
    return Scene(tuple(objects[i] for i in order), _clutter(rng), _background(rng))


def _sized(rng: np.random.Generator, req: Request) -> Request:
    """``req`` with its size class decided (small with probability P_SMALL when left open)."""
    small = bool(rng.random() < P_SMALL) if req.small is None else req.small
    return Request(req.colour, req.shape, small, req.quadrant)


def _distractor(rng: np.random.Generator, forbid: Forbid | None, small: bool | None) -> Request:
    """Free attributes for a non-target object, resampled until ``forbid`` allows them."""
    for _ in range(100 * MAX_TRIES):
        req = _sized(rng, Request(pick(rng, COLOUR_NAMES), pick(rng, SHAPES), small))
        if forbid is None or not forbid(req.colour, req.shape, req.small):
            return req
    raise RuntimeError("forbid rejects every distractor")


def pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    """A uniform choice (via ``integers``, whose bit stream numpy keeps stable across versions)."""
    return options[int(rng.integers(len(options)))]


def _place(rng: np.random.Generator, req: Request, placed: list[Obj]) -> Obj | None:
    """Sample colour jitter, size and position for a sized ``req`` away from the ``placed`` objects; None if
    no spot was found."""
    colour = req.colour or pick(rng, COLOUR_NAMES)
    shape = req.shape or pick(rng, SHAPES)
    small = bool(req.small)
    quadrant = req.quadrant or pick(rng, QUADRANTS)
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)
    rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter))
    for _ in range(MAX_TRIES):
        cx, cy, size = _small_spot(rng, quadrant) if small else _large_spot(rng, quadrant)
        obj = Obj(colour, shape, rgb, cx, cy, size)
        if obj.small == small and _in_quadrant(obj.box, quadrant) and all(_apart(obj.box, o.box) for o in placed):
            return obj
    return None


def _small_spot(rng: np.random.Generator, quadrant: str) -> tuple[float, float, float]:
    """Centre and size of a small object inside one reference cell of the quadrant, 1 px from its edges."""
    half = REF_GRID // 2
    row = int(rng.integers(half)) + (half if quadrant.startswith("bottom") else 0)
    col = int(rng.integers(half)) + (half if quadrant.endswith("right") else 0)
    px = int(rng.integers(SMALL_PX[0], SMALL_PX[1] + 1))
    cell = REF_SIZE // REF_GRID
    free = cell - 2 - px  # room left for the box inside the cell, after a 1-px margin on both sides
    x0 = col * cell + 1 + rng.random() * free
    y0 = row * cell + 1 + rng.random() * free
    return _norm(x0 + px / 2), _norm(y0 + px / 2), _norm(px)


def _large_spot(rng: np.random.Generator, quadrant: str) -> tuple[float, float, float]:
    """Centre and size of a large object anywhere in the quadrant (containment is checked by the caller)."""
    px = LARGE_PX[0] + rng.random() * (LARGE_PX[1] - LARGE_PX[0])
    lo_x = REF_SIZE / 2 if quadrant.endswith("right") else 0.0
    lo_y = REF_SIZE / 2 if quadrant.startswith("bottom") else 0.0
    cx = lo_x + px / 2 + rng.random() * (REF_SIZE / 2 - px)
    cy = lo_y + px / 2 + rng.random() * (REF_SIZE / 2 - px)
    return _norm(cx), _norm(cy), _norm(px)


def _norm(ref_px: float) -> float:
    """Reference pixels to normalised units, rounded to 5 decimals to keep the JSON short."""
    return round(ref_px / REF_SIZE, 5)


def _in_quadrant(box: Box, quadrant: str) -> bool:
    """Box inside the quadrant, GAP_PX from the midlines and 1 px from the image border (reference px)."""
    gap, edge = GAP_PX / REF_SIZE, 1 / REF_SIZE
    x_ok = box[0] >= 0.5 + gap and box[2] <= 1 - edge if quadrant.endswith("right") else (
        box[0] >= edge and box[2] <= 0.5 - gap)
    y_ok = box[1] >= 0.5 + gap and box[3] <= 1 - edge if quadrant.startswith("bottom") else (
        box[1] >= edge and box[3] <= 0.5 - gap)
    return x_ok and y_ok


def _apart(a: Box, b: Box) -> bool:
    """At least GAP_PX reference pixels between the boxes along x or y."""
    gap = GAP_PX / REF_SIZE
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _clutter(rng: np.random.Generator) -> tuple[Clutter, ...]:
    """Grey segments (2/3) and specks (1/3) anywhere in the image; objects are drawn over them."""
    out = []
    for _ in range(int(rng.integers(N_CLUTTER[0], N_CLUTTER[1] + 1))):
        x0, y0 = rng.random(), rng.random()
        length = 2 / REF_SIZE if rng.random() < 1 / 3 else 0.05 + rng.random() * 0.25
        dx, dy = rng.random() * 2 - 1, rng.random() * 2 - 1
        norm = math.hypot(dx, dy) or 1.0
        x1 = min(max(x0 + length * dx / norm, 0.0), 1.0)
        y1 = min(max(y0 + length * dy / norm, 0.0), 1.0)
        width = 1 + int(rng.integers(2))
        out.append(Clutter(*(round(v, 5) for v in (x0, y0, x1, y1)), width, int(rng.integers(90, 161))))
    return tuple(out)


def _background(rng: np.random.Generator) -> Background:
    """Dark grey gradient with a slight random tint and a per-scene noise seed."""
    base0, base1 = int(rng.integers(25, 70)), int(rng.integers(25, 70))
    tint = [int(t) for t in rng.integers(-6, 7, 3)]
    dx, dy = 0, 0
    while dx == 0 and dy == 0:
        dx, dy = (int(v) for v in rng.integers(-1, 2, 2))
    return Background(tuple(base0 + t for t in tint), tuple(base1 + t for t in tint), dx, dy,
                      int(rng.integers(2**31)))


# --------------------------------------------------------------------------------------------- rendering


def pixel_box(obj: Obj, size: int) -> tuple[int, int, int, int]:
    """The object's bounding box in pixels at image side ``size``, half-open: [x0, x1) x [y0, y1)."""
    x0, y0, x1, y1 = obj.box
    return tuple(math.floor(v * size + 0.5) for v in (x0, y0, x1, y1))  # type: ignore[return-value]


def render(scene: Scene, size: int) -> Image.Image:
    """The scene as a ``size`` x ``size`` RGB image: background, then clutter, then objects."""
    image = Image.fromarray(_background_pixels(scene.background, size), "RGB")
    draw = ImageDraw.Draw(image)
    for c in scene.clutter:
        xy = [math.floor(v * (size - 1) + 0.5) for v in (c.x0, c.y0, c.x1, c.y1)]
        draw.line(xy, fill=(c.grey,) * 3, width=max(1, math.floor(c.width * size / REF_SIZE + 0.5)))
    for obj in scene.objects:
        _draw_object(draw, obj, size, obj.rgb)
    return image


def render_mask(scene: Scene, size: int) -> np.ndarray:
    """Object-id map at ``size``: 0 for background, i + 1 where object i is drawn (same primitives)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for i, obj in enumerate(scene.objects):
        _draw_object(draw, obj, size, i + 1)
    return np.asarray(mask)


def coverage(scene: Scene, size: int = REF_SIZE) -> float:
    """Fraction of the image's pixels covered by objects."""
    return float((render_mask(scene, size) > 0).mean())


def _draw_object(draw: ImageDraw.ImageDraw, obj: Obj, size: int, fill: int | tuple[int, int, int]) -> None:
    """Draw the filled shape inside its pixel box (PIL boxes are inclusive, hence the -1)."""
    x0, y0, x1, y1 = pixel_box(obj, size)
    x1, y1 = x1 - 1, y1 - 1
    if obj.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif obj.shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fill)
    elif obj.shape == "cross":
        t = max(1, (x1 - x0 + 1) // 3)  # bar thickness
        mx, my = (x0 + x1 + 1 - t) // 2, (y0 + y1 + 1 - t) // 2
        draw.rectangle([mx, y0, mx + t - 1, y1], fill=fill)
        draw.rectangle([x0, my, x1, my + t - 1], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def _background_pixels(bg: Background, size: int) -> np.ndarray:
    """Gradient plus uniform integer noise, in integer arithmetic only (bit-exact on every platform)."""
    idx = 2 * np.arange(size, dtype=np.int32) + 1 - size  # pixel centres, scaled to [-(size-1), size-1]
    proj = bg.dx * idx[None, :] + bg.dy * idx[:, None]
    span = (size - 1) * (abs(bg.dx) + abs(bg.dy))
    lo, hi = np.array(bg.rgb0, np.int32), np.array(bg.rgb1, np.int32)
    steps = np.arange(2 * span + 1, dtype=np.int32)[:, None]
    grad = (lo + (hi - lo) * steps // (2 * span))[proj + span]  # a lookup table over projection values
    noise = np.random.default_rng(bg.noise_seed).integers(-NOISE, NOISE + 1, (size, size, 3), dtype=np.int16)
    return np.clip(grad + noise, 0, 255).astype(np.uint8)
