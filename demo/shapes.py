"""Procedural scenes of small coloured shapes, zoomed crops of them, and yes/no questions about them.

A scene is a "photo" of `SCENE_SIZE` = 336 px: a dark background with 3-7 non-overlapping shapes (6 colours x
5 shapes = 30 object classes), each from 8 px to 58 px across. The model sees it as LLaVA sees a photo larger
than its input: downsampled to `IMAGE_SIZE` = 168 px (12 x 12 patches of 14 px). So the smallest shapes are
2-4 model pixels across at full scale, their outline lost to the downsampling, while a crop of the original
around them, zoomed 2x (what the crop baseline of BLINK.md §9 cuts), shows them at 8-14 px: fine detail that
only zooming reveals. Shapes are drawn at 2x the scene size and box-downsampled, so even the smallest is
antialiased. Shapes sit near the centres of the model's patches (`ALIGN`).

The "world" is not uniform, so POPE's popular and adversarial negatives mean something: colours and shapes
have fixed popularity weights, and each scene favours a palette of two colours and one shape, so classes
that share a colour or a shape co-occur more often than chance.

A `World` changes the defaults, for the experiments of issue 16 (demo/EXPERIMENTS.md); every generator below takes
one. The bundled demo's is `checked` with one `shape`, squares (demo/MODEL_CARD.md). `one_colour` paints each scene
in one colour (its palette's first), so that within a scene only shape tells objects apart: no question whose colour
is in view can be answered from colour alone. `shape` is the other way round: every object is that one shape, and
the questions and POPE's negatives ask about its six classes only (`World.classes`), so only colour tells objects
apart. `placement` says where shapes sit: "patch" (the default) on the model's patch centres; but the crop mode's 2x
crop (r = 3, context 2) and its 6x one (r = 2, context 1) cut on patch edges, so such a shape lands on a patch
corner of the zoomed crop, cut in four. "quarter" moves every shape a quarter patch (7 scene px) right and down,
onto the patch centres of those crops where they are not clipped by the image's edge; "crop" puts each shape on a
patch centre of the 2x crop of the r = 3 region that holds it, clipped or not (so, at full scale, on a patch centre,
edge or corner). `checked` draws the red, green and blue shapes as a fine check of their colour and its complement
about a grey (`CHECKED`), one scene pixel a cell below 2 * `CHECK_CELL` px across: the 2x downsampling averages such
a check to the same grey for all three colours, so the colour of a small red, green or blue shape is not in the
model's input at all, while a 2x crop of the photo shows it pixel for pixel. Larger shapes get larger cells (one per
CHECK_CELL px), which survive.

Views are what the model is shown, at `IMAGE_SIZE` (`model_view`: pad to square, bicubic resize, as
`blink_jax.processing.preprocess_uint8`): the full scene, a crop of the original with the crop mode's geometry
(`crop_view`), or a region of the full view upsampled, as TokenSR's teacher crops (`teacher_view`).

Everything is a pure function of `(seed, stream, index)` through `np.random.default_rng([seed, stream, index])`:
the training, validation and POPE streams never share a scene, and any item can be regenerated alone.

`write_pope` writes POPE's release layout: `coco_pope_{random,popular,adversarial}.json` (JSONL lines
`question_id`, `image`, `text`, `label`), the images (at the scene size) as `val2014/COCO_val2014_<12
digits>.png`, and `shapes_annotations.json` with every object's class, box and size (scene pixels), for
per-size breakdowns.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from blink_jax.blink.crop import CropConfig, crop_box
from blink_jax.blink.dtr import region_box
from blink_jax.processing.image import preprocess_uint8
from demo.pope import SPLITS

SCENE_SIZE = 336  # the original image's side, pixels
IMAGE_SIZE = 168  # the model's input side: scenes are shown downsampled 2x
PATCH = 14  # the model's patch, pixels of its input
GRID = IMAGE_SIZE // PATCH
SUPERSAMPLE = 2  # of the scene size

COLOURS = {"red": (220, 45, 40), "green": (40, 185, 70), "blue": (50, 105, 240), "yellow": (235, 210, 40),
           "white": (235, 235, 235), "purple": (165, 70, 215)}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
CLASSES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)  # the POPE "objects"
COLOUR_WEIGHTS = np.array([0.25, 0.2, 0.18, 0.15, 0.12, 0.1])
SHAPE_WEIGHTS = np.array([0.3, 0.25, 0.2, 0.15, 0.1])

# (name, smallest, largest + 1) side in scene pixels. In the model's input (half that): "tiny" 4-7 px and
# "small" 7-12 px, below one 14 px patch; "large" 20-29 px, up to three patches.
SIZE_BUCKETS = (("tiny", 8, 14), ("small", 14, 24), ("medium", 24, 40), ("large", 40, 58))
SIZE_BUCKET_PROBS = (0.35, 0.25, 0.2, 0.2)
SUB_PATCH = ("tiny", "small")

TRAIN, VAL, POPE, MIX = 0, 1, 2, 3  # random streams
MIN_VISIBLE = 0.6  # a shape cut by a crop counts as in the crop when this share of its box is inside
# Shapes sit on the centres of the model's patches, moved by up to this many scene pixels. A CLIP ViT has no
# translation equivariance inside a patch; one trained from scratch for minutes does not learn shapes at every
# sub-patch offset. (Zoomed crops move them off-centre; training shows those too.)
ALIGN = 4.0
PLACEMENTS = ("patch", "quarter", "crop")  # World.placement (module docstring)
QUARTER = SCENE_SIZE / GRID / 4  # "quarter": scene px right and down of the patch centre
CROP_REGION, CROP_CONTEXT = 3, 2.0  # "crop": the crop mode's default geometry, whose patch centres shapes sit on
CROP_ALIGN = 2.0  # "crop": shapes move by up to this many scene px (2 model px of the 2x crop)
CHECKED = ("red", "green", "blue")  # World.checked: drawn as a check of the colour and its complement
CHECK_GREY, CHECK_GREY_JITTER = 128, 8  # the check's mean, per channel, moved by up to the jitter per shape
CHECK_CELL = 16  # scene px of a shape's side per check cell (at least one cell of 1 px)


@dataclasses.dataclass(frozen=True)
class World:
    """How scenes are drawn (module docstring): the bundled demo's is `World(checked=True, shape="square")`."""
    one_colour: bool = False  # every shape of a scene in one colour
    placement: str = "patch"  # where shapes sit: one of PLACEMENTS
    checked: bool = False  # CHECKED colours drawn as fine checks that the 2x downsampling averages to grey
    shape: str | None = None  # every object is this shape, so only colour tells objects apart; None: any of SHAPES

    @property
    def classes(self) -> tuple[str, ...]:
        """The object classes this world draws (and asks about): CLASSES, or those of `shape` alone."""
        return CLASSES if self.shape is None else tuple(c for c in CLASSES if c.split()[1] == self.shape)

    def is_check(self, colour: str) -> bool:
        """Whether shapes of `colour` are drawn as fine checks in this world."""
        return self.checked and colour in CHECKED

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement {self.placement!r} is unknown; use one of {', '.join(PLACEMENTS)}")
        if self.shape is not None and self.shape not in SHAPES:
            raise ValueError(f"shape {self.shape!r} is unknown; use one of {', '.join(SHAPES)}")


@functools.lru_cache
def crop_centres(size: int = SCENE_SIZE) -> np.ndarray:  # [N, 2] scene px
    """The points of a `size` px scene that the 2x crop (CROP_REGION, CROP_CONTEXT) of the region holding them
    shows on a patch centre: per region, its crop box's patch centres mapped back (`view_point` inverted) and
    kept where they fall inside the region, CROP_ALIGN from its edges. Read only (cached)."""
    per_row = GRID // CROP_REGION
    side = size / per_row
    cfg = CropConfig(region_size=CROP_REGION, crop_context=CROP_CONTEXT)
    out = []
    for region in range(per_row ** 2):
        box = crop_box(region, size, size, grid=GRID, image_size=IMAGE_SIZE, crop=cfg, pad_to_square=True)
        w, h = box[2] - box[0], box[3] - box[1]
        big = max(w, h)
        centres = (np.arange(GRID) + 0.5) * PATCH * big / IMAGE_SIZE  # in the padded crop, scene px
        xs = box[0] - (big - w) // 2 + centres
        ys = box[1] - (big - h) // 2 + centres
        row, col = divmod(region, per_row)
        inside = lambda v, i: (v >= i * side + CROP_ALIGN) & (v < (i + 1) * side - CROP_ALIGN)  # jitter included
        xs, ys = xs[inside(xs, col)], ys[inside(ys, row)]
        out += [(x, y) for y in ys for x in xs]
    return np.asarray(out)


def question_text(colour: str, shape: str) -> str:
    return f"Is there a {colour} {shape} in the image?"


def size_bucket(size: float) -> str:
    for name, lo, hi in SIZE_BUCKETS:
        if lo <= size < hi:
            return name
    return SIZE_BUCKETS[0][0] if size < SIZE_BUCKETS[0][1] else SIZE_BUCKETS[-1][0]


@dataclasses.dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    cx: float  # centre, pixels of the scene (SCENE_SIZE px)
    cy: float
    size: float  # side of the bounding box, pixels
    rgb: tuple[int, int, int]
    check: tuple[int, int, int] | None = None  # a check's other colour (World.checked); None: solid `rgb`

    @property
    def cell(self) -> int:  # a check's cell side, scene pixels
        return max(1, int(self.size // CHECK_CELL))

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def box(self) -> tuple[float, float, float, float]:  # (left, top, right, bottom)
        h = self.size / 2
        return self.cx - h, self.cy - h, self.cx + h, self.cy + h

    @property
    def bucket(self) -> str:
        return size_bucket(self.size)


@dataclasses.dataclass(frozen=True)
class Scene:
    size: int
    background: tuple[int, int, int]
    tint: tuple[float, float, float]  # a linear gradient of this colour along `angle`, -0.5..0.5 across the image
    angle: float
    objects: tuple[Shape, ...]

    @property
    def classes(self) -> frozenset[str]:
        return frozenset(o.name for o in self.objects)


@dataclasses.dataclass(frozen=True)
class View:
    """What one training or eval image shows: the image, the classes in it and the classes cut by its edge."""
    image: Image.Image
    objects: tuple[tuple[str, float, tuple[float, float, float, float]], ...]  # (class, side, box) in view pixels
    ambiguous: frozenset[str]  # classes partly in view only: never asked about
    box: tuple[int, int, int, int] | None  # the crop box in the scene's pixels; None for the full scene

    @property
    def present(self) -> frozenset[str]:
        return frozenset(name for name, *_ in self.objects)

    def resized(self, size: int) -> "View":
        """The view at `size` pixels (PIL bicubic), sizes and boxes scaled."""
        if self.image.size == (size, size):
            return self
        s = size / self.image.size[0]
        return dataclasses.replace(self, image=self.image.resize((size, size), Image.Resampling.BICUBIC),
                                   objects=tuple((n, z * s, tuple(v * s for v in b)) for n, z, b in self.objects))


def item_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


N_OBJECTS = (3, 7)  # shapes per scene, fewest and most


def random_scene(rng: np.random.Generator, size: int = SCENE_SIZE, n_objects: tuple[int, int] = N_OBJECTS,
                 min_classes: int = 1, align: float | None = ALIGN, world: World = World(),
                 max_classes: int | None = None) -> Scene:
    """A scene with n_objects[0]..n_objects[1] shapes (fewer if they do not fit), min_classes..max_classes classes.

    With `align`, each shape is centred on the centre of one of the model's GRID x GRID patches (or where the
    world's `placement` says), moved by up to `align` px each way (CROP_ALIGN at most for "crop"); with None,
    anywhere. In a `one_colour` world every shape has the palette's first colour; in a `checked` one the CHECKED
    colours are checks of `rgb` and `check`, whose mean is CHECK_GREY (moved by up to CHECK_GREY_JITTER)."""
    colours, shapes = list(COLOURS), list(SHAPES)
    while True:
        palette = rng.choice(len(colours), size=2, replace=False, p=COLOUR_WEIGHTS)
        favourite = rng.choice(len(shapes), p=SHAPE_WEIGHTS)
        n = int(rng.integers(n_objects[0], n_objects[1] + 1))
        specs = []
        for _ in range(n):
            if world.one_colour:
                c = palette[0]
            else:
                c = palette[rng.integers(2)] if rng.random() < 0.7 else rng.choice(len(colours), p=COLOUR_WEIGHTS)
            s = favourite if rng.random() < 0.35 else rng.choice(len(shapes), p=SHAPE_WEIGHTS)
            if world.shape is not None:
                s = shapes.index(world.shape)
            name, lo, hi = SIZE_BUCKETS[rng.choice(len(SIZE_BUCKETS), p=SIZE_BUCKET_PROBS)]
            specs.append((colours[c], shapes[s], float(rng.uniform(lo, hi))))
        specs.sort(key=lambda x: -x[2])  # big ones first: they are the hardest to fit
        placed: list[Shape] = []
        for colour, shape, side in specs:
            for _ in range(50):
                if align is None:
                    cx, cy = rng.uniform(side / 2 + 1, size - side / 2 - 1, size=2)
                elif world.placement == "crop":
                    jitter = min(align, CROP_ALIGN)
                    points = crop_centres(size)
                    fits = (points - side / 2 - jitter >= 1) & (points + side / 2 + jitter <= size - 1)
                    points = points[fits.all(1)]
                    cx, cy = points[rng.integers(len(points))] + rng.uniform(-jitter, jitter, size=2)
                else:
                    centres = (np.arange(GRID) + 0.5) * size / GRID + (QUARTER if world.placement == "quarter" else 0.0)
                    centres = centres[(centres - side / 2 - align >= 1) & (centres + side / 2 + align <= size - 1)]
                    cx, cy = rng.choice(centres, size=2) + rng.uniform(-align, align, size=2)
                rgb, check = _jitter(rng, COLOURS[colour]), None
                if world.is_check(colour):
                    rgb, check = _check(rng, rgb)
                candidate = Shape(colour, shape, float(cx), float(cy), side, rgb, check)
                if all(not _overlap(candidate.box, o.box, gap=2.0) for o in placed):
                    placed.append(candidate)
                    break
        background = tuple(int(x) for x in rng.integers(15, 80, size=3))
        tint = tuple(float(x) for x in rng.uniform(-25, 25, size=3))
        scene = Scene(size, background, tint, float(rng.uniform(0, 2 * np.pi)), tuple(placed))
        if min_classes <= len(scene.classes) <= (len(world.classes) if max_classes is None else max_classes):
            return scene


def _jitter(rng, rgb) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in rgb)


def _check(rng, rgb) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(rgb, its complement about a jittered grey): the two colours of a check whose mean is that grey."""
    grey = CHECK_GREY + rng.integers(-CHECK_GREY_JITTER, CHECK_GREY_JITTER + 1, size=3)
    rgb = np.clip(rgb, np.maximum(0, 2 * grey - 255), np.minimum(255, 2 * grey))
    return tuple(int(v) for v in rgb), tuple(int(v) for v in 2 * grey - rgb)


def _overlap(a, b, gap: float) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def render(scene: Scene, supersample: int = SUPERSAMPLE) -> Image.Image:
    """The scene as an RGB image of scene.size pixels; shapes drawn at `supersample`x, then box-averaged."""
    n = scene.size
    t = (np.arange(n, dtype=np.float32) + 0.5) / n - 0.5
    ramp = np.cos(scene.angle) * t[None, :] + np.sin(scene.angle) * t[:, None]  # [n, n] in about -0.7..0.7
    bg = np.asarray(scene.background, np.float32) + ramp[..., None] * np.asarray(scene.tint, np.float32)
    # The background is smooth: drawn at 1x and blown up, it box-averages back to exactly itself.
    img = Image.fromarray(np.clip(np.round(bg), 0, 255).astype(np.uint8))
    img = img.resize((n * supersample,) * 2, resample=Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        if o.check is None:
            _draw_shape(draw, o, o.rgb, supersample)
            continue
        # A check: the shape as a mask over a checkerboard of `cell` scene px cells, in the scene's own pixel grid
        # (so a 1 px check is exact after the box average).
        mask = Image.new("L", img.size, 0)
        _draw_shape(ImageDraw.Draw(mask), o, 255, supersample)
        x0, y0, x1, y1 = (int(np.floor(v)) * supersample for v in o.box)
        x1, y1 = x1 + supersample, y1 + supersample
        ys, xs = np.mgrid[y0:y1, x0:x1] // (supersample * o.cell)
        tile = np.where(((xs + ys) % 2 == 0)[..., None], np.uint8(o.rgb), np.uint8(o.check)).astype(np.uint8)
        img.paste(Image.fromarray(tile), (x0, y0), mask.crop((x0, y0, x1, y1)))
    return img.reduce(supersample)


def _draw_shape(draw: ImageDraw.ImageDraw, o: Shape, fill, supersample: int) -> None:
    x0, y0, x1, y1 = (v * supersample for v in o.box)
    cx, cy = o.cx * supersample, o.cy * supersample
    if o.shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif o.shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif o.shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif o.shape == "cross":
        arm = (x1 - x0) / 6
        draw.rectangle([x0, cy - arm, x1 - 1, cy + arm - 1], fill=fill)
        draw.rectangle([cx - arm, y0, cx + arm - 1, y1 - 1], fill=fill)
    else:
        raise ValueError(f"unknown shape {o.shape!r}: expected one of {SHAPES}")


def _box_objects(scene: Scene, box: tuple[float, float, float, float]) -> tuple[list, set]:
    """The scene's shapes as seen through `box` (scene pixels): ([(class, side, box)] relative to the box's
    corner, unscaled; classes cut by its edge with less than MIN_VISIBLE of their box inside)."""
    objects, ambiguous = [], set()
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        inside = max(0.0, min(x1, box[2]) - max(x0, box[0])) * max(0.0, min(y1, box[3]) - max(y0, box[1]))
        share = inside / (o.size * o.size)
        if share >= MIN_VISIBLE:
            objects.append((o.name, o.size, (x0 - box[0], y0 - box[1], x1 - box[0], y1 - box[1])))
        elif share > 0:
            ambiguous.add(o.name)
    return objects, ambiguous - {name for name, *_ in objects}


def model_view(image: Image.Image, objects: Sequence[tuple], ambiguous=frozenset(), box=None,
               size: int = IMAGE_SIZE) -> View:
    """`image` as the model sees it (`preprocess_uint8`: pad to square with the CLIP mean, bicubic resize to
    `size`), with its objects' boxes mapped the same way."""
    w, h = image.size
    side = max(w, h)
    dx, dy, s = (side - w) // 2, (side - h) // 2, size / side  # expand2square's paste offset, then the resize
    shown = Image.fromarray(preprocess_uint8(image, image_size=size, pad_to_square=True))
    mapped = tuple((n, z * s, ((b[0] + dx) * s, (b[1] + dy) * s, (b[2] + dx) * s, (b[3] + dy) * s))
                   for n, z, b in objects)
    return View(shown, mapped, frozenset(ambiguous), box)


def full_view(scene: Scene, image: Image.Image | None = None) -> View:
    """The whole scene, downsampled to the model's input."""
    image = render(scene) if image is None else image
    return model_view(image, tuple((o.name, o.size, o.box) for o in scene.objects), box=None)


def zoom_view(scene: Scene, box: tuple[int, int, int, int], image: Image.Image | None = None) -> View:
    """The original's pixel `box` (scene pixels), shown to the model: a zoomed crop with the original's detail."""
    image = render(scene) if image is None else image
    objects, ambiguous = _box_objects(scene, box)
    return model_view(image.crop(box), objects, ambiguous, box)


def crop_view(scene: Scene, region: int, region_size: int = 3, context: float = 2.0,
              image: Image.Image | None = None) -> View:
    """The crop mode's pass-2 image for region `region` (BLINK.md §9, `blink_jax.blink.crop.crop_box`): the
    r x r region of the model's grid, grown by `context`, cut from the original. r = 3, context 2: a 2x zoom."""
    cfg = CropConfig(region_size=region_size, crop_context=context)
    box = crop_box(region, scene.size, scene.size, grid=GRID, image_size=IMAGE_SIZE, crop=cfg, pad_to_square=True)
    return zoom_view(scene, box, image)


def upsampled_view(scene: Scene, box: tuple[int, int, int, int], image: Image.Image | None = None) -> View:
    """The same area as `zoom_view(scene, box)`, but cut from the model's input (the downsampled scene) and
    shown at the input size: the crop's magnification without the original's pixels."""
    full = full_view(scene, image)
    k = IMAGE_SIZE / scene.size
    small = tuple(int(round(v * k)) for v in box)
    objects, ambiguous = _box_objects(scene, box)
    return model_view(full.image.crop(small), [(n, z * k, tuple(v * k for v in b)) for n, z, b in objects],
                      ambiguous, box)


def view_point(scene: Scene, box: tuple[int, int, int, int] | None, x: float, y: float,
               size: int = IMAGE_SIZE) -> tuple[float, float]:
    """Where the scene point (x, y) lands in the model's input showing `box` of it (None: the full scene), as
    `model_view` maps it: pad to square, then resize to `size`."""
    if box is None:
        box = (0, 0, scene.size, scene.size)
    w, h = box[2] - box[0], box[3] - box[1]
    side = max(w, h)
    s = size / side
    return (x - box[0] + (side - w) // 2) * s, (y - box[1] + (side - h) // 2) * s


def patch_offset(x: float, y: float, patch: int = PATCH) -> float:
    """How far the model-input point (x, y) is from the centre of its patch, in patches along the worse axis:
    0 on the centre, 0.5 on a patch edge (0.5 on both axes: a corner, where a small shape is cut in four)."""
    return max(abs(x % patch - patch / 2), abs(y % patch - patch / 2)) / patch


def region_scene_box(scene: Scene, region: int, region_size: int) -> tuple[int, int, int, int]:
    """Region `region`'s box of the model's grid (`blink_jax.blink.dtr.region_box`) in the scene's pixels."""
    k = scene.size / IMAGE_SIZE
    return tuple(int(round(v * k)) for v in region_box(region, GRID, region_size, PATCH))


def teacher_view(scene: Scene, region: int, region_size: int, image: Image.Image | None = None) -> View:
    """What TokenSR's teacher sees (BLINK.md §5, `train.teacher.crop_pixels`): region `region`'s box in the
    model's input, resized back to the input size: no detail the input lacks."""
    return upsampled_view(scene, region_scene_box(scene, region, region_size), image)


def region_of(cx: float, cy: float, region_size: int, size: int = SCENE_SIZE) -> int:
    """The r x r region of the model's grid (row-major) holding the point (cx, cy) of a `size` px scene."""
    per_row = GRID // region_size
    side = size / per_row
    return min(int(cy // side), per_row - 1) * per_row + min(int(cx // side), per_row - 1)


# Zoomed training views: (region size, context) of the crop mode's geometry, 1.5x to 6x.
CROP_GEOMETRIES = ((3, 2.0), (3, 2.0), (2, 2.0), (4, 2.0), (3, 1.0), (4, 1.5), (2, 1.0), (6, 1.0))
TEACHER_REGIONS = (3, 4, 6)


def training_view(seed: int, stream: int, index: int, *, p_zoom: float = 0.45, p_teacher: float = 0.1,
                  world: World = World(), n_objects: tuple[int, int] = N_OBJECTS) -> View:
    """Item `index` of a stream: the full scene; with probability p_zoom a crop of the original around a region
    (usually one holding a shape, so the crop is rarely empty) with one of CROP_GEOMETRIES; with probability
    p_teacher a region of the full view upsampled, as TokenSR's teacher sees it. `world`, `n_objects`:
    `random_scene`'s."""
    rng = item_rng(seed, stream, index)
    scene = random_scene(rng, n_objects=n_objects, world=world)
    u = rng.random()
    if u >= p_zoom + p_teacher:
        return full_view(scene)
    if u < p_zoom:
        r, context = CROP_GEOMETRIES[rng.integers(len(CROP_GEOMETRIES))]
    else:
        r, context = int(rng.choice(TEACHER_REGIONS)), None
    if scene.objects and rng.random() < 0.85:
        o = scene.objects[rng.integers(len(scene.objects))]
        region = region_of(o.cx, o.cy, r, scene.size)
    else:
        region = int(rng.integers((GRID // r) ** 2))
    return crop_view(scene, region, r, context) if context else teacher_view(scene, region, r)


def patch_targets(view: View, grid: int) -> np.ndarray:  # [grid * grid, classes + 1]
    """Per patch (row-major), the target of the vision tower's auxiliary loss, as weights over the classes
    and a last "nothing" column: the patch holding a shape's centre gets its class (shared when several
    centres fall in one patch), a patch with no part of any shape gets "nothing", and the other patches a
    shape overlaps get an all-zero row, i.e. no loss: whether they show the whole shape is not theirs to say."""
    out = np.zeros((grid, grid, len(CLASSES) + 1), np.float32)
    side = view.image.size[0] / grid
    edges = np.arange(grid + 1) * side
    index = {c: i for i, c in enumerate(CLASSES)}
    touched = np.zeros((grid, grid), bool)
    for name, size, (x0, y0, x1, y1) in view.objects:
        over_x = np.minimum(edges[1:], x1) - np.maximum(edges[:-1], x0) > 0  # [grid]
        over_y = np.minimum(edges[1:], y1) - np.maximum(edges[:-1], y0) > 0
        touched |= over_y[:, None] & over_x[None, :]
        row = min(int((y0 + y1) / 2 // side), grid - 1)
        col = min(int((x0 + x1) / 2 // side), grid - 1)
        out[row, col, index[name]] = 1.0
    out[..., -1] = ~touched
    return out.reshape(grid * grid, len(CLASSES) + 1)


def class_patches(view: View, name: str, grid: int) -> np.ndarray:  # [grid * grid] float32
    """1 on the patches (row-major) that any instance of class `name` overlaps, else 0."""
    out = np.zeros((grid, grid), np.float32)
    edges = np.arange(grid + 1) * (view.image.size[0] / grid)
    for other, _, (x0, y0, x1, y1) in view.objects:
        if other == name:
            over_x = np.minimum(edges[1:], x1) - np.maximum(edges[:-1], x0) > 0
            over_y = np.minimum(edges[1:], y1) - np.maximum(edges[:-1], y0) > 0
            out[over_y[:, None] & over_x[None, :]] = 1.0
    return out.reshape(-1)


def sample_questions(rng: np.random.Generator, view: View, n: int, p_shape: float = 0.0, p_sibling: float = 0.0,
                     classes: Sequence[str] = CLASSES) -> list[tuple[str, str, bool]]:
    """Up to n (colour, shape, answer) questions, half about present classes and half about absent ones;
    half of the negatives share a colour or a shape with something present, as POPE's adversarial ones do.
    With `p_shape`, that share of the negatives first is an absent class in a present colour (a red square
    when a red circle is there): only the shape tells them apart. With `p_sibling` (for World.checked), that
    share of them, before `p_shape`'s, is an absent class in another CHECKED colour with the shape of a present
    CHECKED one (a green or blue square when a red square is there): where the check is too fine to see, they
    and the present class look the same. Negatives are drawn from `classes` (the world's, `World.classes`)."""
    present = sorted(view.present)
    absent = [c for c in classes if c not in view.present and c not in view.ambiguous]
    hard = [c for c in absent if any(set(c.split()) & set(p.split()) for p in present)]
    colour_mates = [c for c in absent if c.split()[0] in {p.split()[0] for p in present}]
    checked_shapes = {p.split()[1] for p in present if p.split()[0] in CHECKED}
    siblings = [c for c in absent if c.split()[0] in CHECKED and c.split()[1] in checked_shapes]
    n_pos = n // 2 if present else 0
    positives = [present[i] for i in rng.choice(len(present), size=n_pos, replace=n_pos > len(present))] \
        if n_pos else []
    negatives = []
    for _ in range(n // 2 if absent else 0):  # every class in view (a World.shape world has six): no negatives
        if p_sibling and siblings and rng.random() < p_sibling:
            pool = siblings
        elif p_shape and colour_mates and rng.random() < p_shape:
            pool = colour_mates
        else:
            pool = hard if hard and rng.random() < 0.5 else absent
        negatives.append(pool[rng.integers(len(pool))])
    out = [(name, True) for name in positives] + [(name, False) for name in negatives]
    order = rng.permutation(len(out))
    return [(*out[i][0].split(), out[i][1]) for i in order]


def smallest_lookalike(objects: Sequence[tuple], name: str) -> tuple | None:
    """Of the (class, size, ...) in view, the smallest that shares class `name`'s colour or its shape (the one a
    model could mistake for it; the first of equal sizes), or None."""
    words = set(name.split())
    alike = [o for o in objects if words & set(o[0].split())]
    return min(alike, key=lambda o: o[1]) if alike else None


def question_target(objects: Sequence[tuple], name: str) -> tuple | None:
    """What a question about class `name` is about, of the (class, size, ...) in view: for a present class its
    largest instance (the first of equal sizes); for an absent one its `smallest_lookalike`; else None."""
    same = [o for o in objects if o[0] == name]
    return max(same, key=lambda o: o[1]) if same else smallest_lookalike(objects, name)


def question_bucket(objects: Sequence[tuple], name: str) -> str:
    """The size bucket of `question_target`, or "none"."""
    target = question_target(objects, name)
    return size_bucket(target[1]) if target else "none"


LOOKALIKE_KINDS = ("yes", "same colour", "same shape")


def question_kind(objects: Sequence[tuple], name: str) -> str:
    """What a question about class `name` needs read, given the (class, size, ...) of what is in view: "yes"
    when the class is there; for an absent one, of its `smallest_lookalike` (`question_bucket`'s), "same colour"
    (a red square when asked for a red circle: only the shape tells them apart) or "same shape" (only the
    colour does); "none" without a look-alike."""
    if any(n == name for n, *_ in objects):
        return "yes"
    alike = smallest_lookalike(objects, name)
    if alike is None:
        return "none"
    return "same colour" if alike[0].split()[0] == name.split()[0] else "same shape"


# ---------------------------------------------------------------------------------------------------- POPE


def pope_image_name(index: int) -> str:
    return f"COCO_val2014_{index + 1:012d}.png"


def pope_scenes(n_images: int, seed: int, positives: int, world: World = World()) -> list[Scene]:
    # and at least `positives` classes absent, for the negatives (only a World.shape world could have fewer)
    return [random_scene(item_rng(seed, POPE, i), min_classes=positives, world=world,
                         max_classes=len(world.classes) - positives)
            for i in range(n_images)]


def pope_questions(scenes: Sequence[Scene], seed: int, questions_per_image: int = 2,
                   classes: Sequence[str] = CLASSES) -> dict[str, list[dict]]:
    """POPE's three splits over `scenes`: the same positives in each (sampled from the image's classes), and
    `questions_per_image / 2` negatives per image sampled as POPE does: uniformly among absent classes
    (random), the most frequent absent classes of the data set (popular), or the absent classes that
    co-occur most with the image's own (adversarial), of `classes` (the world's, `World.classes`). Lines
    alternate yes/no, question ids from 1."""
    if questions_per_image % 2 or questions_per_image < 2:
        raise ValueError(f"questions_per_image={questions_per_image}: give an even number >= 2 (half yes, half no)")
    k = questions_per_image // 2
    index = {c: i for i, c in enumerate(classes)}
    has = np.zeros((len(scenes), len(classes)), np.int64)
    for row, scene in enumerate(scenes):
        for name in scene.classes:
            has[row, index[name]] = 1
    frequency = has.sum(0)  # images holding each class
    cooccur = has.T @ has  # images holding both
    splits: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for i, scene in enumerate(scenes):
        rng = np.random.default_rng([seed, POPE, i, 1])
        gt = sorted(scene.classes, key=index.get)
        if len(gt) < k:
            raise ValueError(f"scene {i} has {len(gt)} classes, fewer than the {k} positives asked for")
        positives = [gt[j] for j in rng.choice(len(gt), size=k, replace=False)]
        absent = [c for c in classes if c not in scene.classes]
        score = cooccur[[index[g] for g in gt]].sum(0)
        negatives = {
            "random": [absent[j] for j in rng.choice(len(absent), size=k, replace=False)],
            "popular": sorted(absent, key=lambda c: (-frequency[index[c]], index[c]))[:k],
            "adversarial": sorted(absent, key=lambda c: (-score[index[c]], -frequency[index[c]], index[c]))[:k],
        }
        for split in SPLITS:
            for pos, neg in zip(positives, negatives[split]):
                for name, label in ((pos, "yes"), (neg, "no")):
                    rows = splits[split]
                    rows.append({"question_id": len(rows) + 1, "image": pope_image_name(i),
                                 "text": question_text(*name.split()), "label": label})
    return splits


def write_pope(out_dir: str | os.PathLike, n_images: int, seed: int, questions_per_image: int = 2,
               world: World = World()) -> dict:
    """Writes a POPE-format eval set of `n_images` scenes to `out_dir`. -> a summary (counts per split)."""
    out = Path(out_dir)
    (out / "val2014").mkdir(parents=True, exist_ok=True)
    scenes = pope_scenes(n_images, seed, questions_per_image // 2, world)
    for i, scene in enumerate(scenes):
        render(scene).save(out / "val2014" / pope_image_name(i), optimize=True)
    splits = pope_questions(scenes, seed, questions_per_image, world.classes)
    for split, rows in splits.items():
        with open(out / f"coco_pope_{split}.json", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    annotations = {
        "generator": "demo.shapes.write_pope", "seed": seed, "n_images": n_images,
        "questions_per_image": questions_per_image, "world": dataclasses.asdict(world), "image_size": SCENE_SIZE,
        "model_image_size": IMAGE_SIZE,
        "patch_size": PATCH,
        "size_buckets": {name: [lo, hi] for name, lo, hi in SIZE_BUCKETS},
        "images": [{"image": pope_image_name(i), "objects": [
            {"name": o.name, "box": [round(v, 2) for v in o.box], "size": round(o.size, 2), "bucket": o.bucket}
            for o in scene.objects]} for i, scene in enumerate(scenes)],
    }
    (out / "shapes_annotations.json").write_text(json.dumps(annotations, indent=1) + "\n")
    return {split: len(rows) for split, rows in splits.items()}


# ---------------------------------------------------------------------------------------------- TokenSR data

MIX_ANNOTATIONS = "llava_v1_5_mix665k.json"  # the file name `train.data.llava_mix` reads
MIX_IMAGE_DIR = "coco/train2017"


def mix_image_name(index: int) -> str:
    return f"{index:012d}.png"


def write_mix(out_dir: str | os.PathLike, n_images: int, seed: int, world: World = World()) -> int:
    """Writes a TokenSR training set in the LLaVA-1.5 mix layout that `python -m train.tokensr --data-dir`
    reads: `llava_v1_5_mix665k.json` (one single-turn conversation per image, "<image>\\n" + a yes/no question
    about the scene, half yes) and the images under `coco/train2017/`. Scenes come from their own stream (MIX),
    so they are none of the backbone's training, validation or POPE scenes. -> the number of examples."""
    out = Path(out_dir)
    (out / MIX_IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_images):
        rng = item_rng(seed, MIX, i)
        scene = random_scene(rng, world=world)
        image = render(scene)
        image.save(out / MIX_IMAGE_DIR / mix_image_name(i), optimize=True)
        view = full_view(scene, image)
        want_yes = i % 2 == 0
        colour, shape, answer = next(q for q in sample_questions(rng, view, 2, classes=world.classes)
                                     if q[2] == want_yes)
        records.append({"id": f"shapes-{i:06d}", "image": f"{MIX_IMAGE_DIR}/{mix_image_name(i)}", "conversations": [
            {"from": "human", "value": "<image>\n" + question_text(colour, shape)},
            {"from": "gpt", "value": "Yes" if answer else "No"}]})
    tmp = out / (MIX_ANNOTATIONS + ".tmp")
    tmp.write_text(json.dumps(records) + "\n")
    os.replace(tmp, out / MIX_ANNOTATIONS)
    return len(records)


def read_annotations(data_dir: str | os.PathLike) -> dict[str, Scene]:
    """image file name -> Scene (objects only; no background) from `shapes_annotations.json`."""
    raw = json.loads((Path(data_dir) / "shapes_annotations.json").read_text())
    scenes = {}
    for item in raw["images"]:
        objects = tuple(Shape(*o["name"].split(), cx=(o["box"][0] + o["box"][2]) / 2,
                              cy=(o["box"][1] + o["box"][3]) / 2, size=o["size"], rgb=(0, 0, 0))
                        for o in item["objects"])
        scenes[item["image"]] = Scene(raw["image_size"], (0, 0, 0), (0.0, 0.0, 0.0), 0.0, objects)
    return scenes


def read_world(data_dir: str | os.PathLike) -> World:
    """The `World` a shapes POPE set was drawn in (its `shapes_annotations.json`; sets older than the field: the
    default world)."""
    raw = json.loads((Path(data_dir) / "shapes_annotations.json").read_text())
    return World(**raw.get("world", {}))


def add_world_arguments(p) -> None:
    """The `World` options as command-line flags (this module's CLI and `python -m train.demo_backbone`)."""
    g = p.add_argument_group("world (an experiment of issue 16; see demo/MODEL_CARD.md)")
    g.add_argument("--one-colour", action="store_true",
                   help="paint each scene in one colour, so only shape tells its objects apart")
    g.add_argument("--checked", action="store_true",
                   help="draw red, green and blue shapes as fine checks of their colour and its complement, which "
                        "the 2x downsampling averages to one grey below %d px across" % (2 * CHECK_CELL))
    g.add_argument("--shape", default=None, choices=SHAPES,
                   help="draw every object as this shape, so only colour tells objects apart (and questions ask "
                        "about that shape's classes only); default: any shape")
    g.add_argument("--placement", default="patch", choices=PLACEMENTS,
                   help="where shapes sit: on the model's patch centres (patch, the default), a quarter patch "
                        "off them (quarter), or on a patch centre of the crop mode's 2x crop of their region "
                        "(crop) (default %(default)s)")


def world_from_args(args) -> World:
    return World(one_colour=args.one_colour, placement=args.placement, checked=args.checked, shape=args.shape)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m demo.shapes",
        description="Write a shapes data set: the POPE-format eval set (coco_pope_{random,popular,adversarial}.json, "
                    "val2014/*.png, shapes_annotations.json) or, with --format llava-mix, TokenSR training data in "
                    "the LLaVA-1.5 mix layout (llava_v1_5_mix665k.json, coco/train2017/*.png).")
    p.add_argument("--out", required=True, help="output folder, e.g. demo/data/pope")
    p.add_argument("--format", default="pope", choices=("pope", "llava-mix"), help="(default %(default)s)")
    p.add_argument("--images", type=int, default=150, help="scenes (default %(default)s)")
    p.add_argument("--questions-per-image", type=int, default=2, help="pope: per split, half yes (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    add_world_arguments(p)
    args = p.parse_args(argv)
    world = world_from_args(args)
    if args.images < 1:
        p.error(f"--images {args.images}: give at least 1")
    if args.format == "llava-mix":
        n = write_mix(args.out, args.images, args.seed, world)
        print(f"wrote {args.out}: {n} images with one question each ({MIX_ANNOTATIONS})")
        return 0
    counts = write_pope(args.out, args.images, args.seed, args.questions_per_image, world)
    print(f"wrote {args.out}: {args.images} images, questions per split {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
