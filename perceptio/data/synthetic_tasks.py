"""Questions posed on a rendered scene, each with exactly one right answer.

Tasks (names as stored in the dataset's `task` column):

- "referring": segment the object(s) an expression picks out ("the small red sphere", "the cube left of the green
  cylinder", "the object nearest the camera", "all the spheres"). Only expressions that pick out exactly the
  intended objects are used; the answer is plain text and the sample carries one mask per referred object.
- "relative_depth": HardBLINK-style. 2-5 points drawn as red circles with letter labels (each letter on its own
  colour) on a copy of the image,
  "Which point is closest to the camera?", answer "(B)". The closest point's metric depth (read at the point's
  pixel; smaller = closer) is at least `depth_margin` (relative) below every other point's, points sit on locally
  smooth surfaces and no marker or label covers another point.
- "vqa_count": "How many spheres are there?" -> "2".
- "vqa_colour": "What colour is the cube?" -> "Red", asked only when the colour-free phrase is unambiguous.
- "vqa_shape": "What shape is the red object?" -> "Sphere", asked only when the phrase is unambiguous.

Left/right compare the visible centroids' columns (with a margin); nearest/farthest compare the objects' centre
distances to the camera (with a relative margin).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .scene_rendering import COLOUR_PALETTE, SHAPES, SIZE_NAMES, SceneObject, SceneRender


TASK_NAMES: tuple[str, ...] = ("referring", "relative_depth", "vqa_count", "vqa_colour", "vqa_shape")

REFERRING_PROMPTS: tuple[str, ...] = (
    "Please segment {expression}.",
    "Can you segment {expression} in this image?",
    "Where is {expression}? Please output the segmentation mask.",
    "Segment {expression}.",
)
REFERRING_ANSWER_SINGLE = "Here it is."
REFERRING_ANSWER_PLURAL = "Here they are."
RELATIVE_DEPTH_QUESTION = "Which point is closest to the camera?"

POINT_LETTERS = "ABCDEFGHIJ"
_MARKER_FILL = (230, 20, 20)
_MARKER_OUTLINE = (255, 255, 255)
# One label colour per letter: at 128 pixels a letter is a 5-pixel glyph that a small vision encoder trained from
# scratch barely resolves, while a colour survives its patch embedding. The letter is still drawn on it.
_LABEL_BACKGROUNDS = (
    (0, 0, 0),
    (255, 140, 0),
    (0, 200, 255),
    (255, 0, 200),
    (140, 255, 0),
    (120, 60, 0),
    (255, 255, 255),
    (0, 90, 60),
    (120, 0, 160),
    (128, 128, 128),
)
_DARK_TEXT = (0, 0, 0)
_LIGHT_TEXT = (255, 255, 255)


def _label_text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return _DARK_TEXT if luminance > 140 else _LIGHT_TEXT


@dataclass(frozen=True)
class TaskConfig:
    """Margins and sampling choices of the tasks."""

    left_right_margin: float = 0.05
    """Minimum gap between visible centroid columns, as a fraction of the image width, for "left of"."""
    distance_margin: float = 0.1
    """Relative gap in centre distance between the nearest (farthest) object and the runner-up."""
    depth_margin: float = 0.1
    """The closest point's metric depth times (1 + depth_margin) is at most every other point's depth."""
    point_count_range: tuple[int, int] = (2, 5)
    marker_radius_fraction: float = 0.02
    min_marker_radius: int = 2
    surface_smoothness: float = 0.04
    """Largest relative depth spread under a marker: points do not straddle an occlusion edge."""
    object_point_probability: float = 0.6
    max_point_tries: int = 60
    max_point_set_attempts: int = 30
    depth_block_share: float = 0.3
    """Share of non-relative-depth samples whose target also includes a depth block."""
    count_random_query_share: float = 0.2
    """Share of count questions about attributes drawn at random rather than from an object in the scene, so that
    zero counts occur."""

    def __post_init__(self) -> None:
        low, high = self.point_count_range
        if not 2 <= low <= high <= len(POINT_LETTERS):
            raise ValueError(
                f"point_count_range must satisfy 2 <= low <= high <= {len(POINT_LETTERS)}, got {self.point_count_range}"
            )
        for name in ("left_right_margin", "distance_margin", "depth_margin", "surface_smoothness"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("object_point_probability", "depth_block_share", "count_random_query_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


DEFAULT_TASK_CONFIG = TaskConfig()
DEPTH_REQUEST = "Also estimate the depth of the scene."


def without_depth_block(row: dict) -> dict[str, object]:
    """The update that makes a dataset row the same question without a depth block: the flag off and the prompt
    without `DEPTH_REQUEST` (for `Dataset.map`)."""
    return {"use_depth_block": False, "prompt": row["prompt"].removesuffix(f" {DEPTH_REQUEST}")}


@dataclass
class TaskSample:
    """One question on one scene. `masks` is bool (K, H, W), one per referred object in answer order."""

    task: str
    prompt: str
    answer: str
    image: np.ndarray
    masks: np.ndarray
    use_depth_block: bool
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ObjectQuery:
    """An attribute phrase: any of size, colour and shape (None = unconstrained)."""

    size: str | None = None
    colour: str | None = None
    shape: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        """Whether `obj` has every attribute the query names."""
        return all(
            wanted is None or wanted == actual
            for wanted, actual in ((self.size, obj.size), (self.colour, obj.colour), (self.shape, obj.shape))
        )

    def phrase(self, plural: bool = False) -> str:
        """Noun phrase without article, e.g. "small red sphere", "red objects"."""
        noun = self.shape or "object"
        words = [word for word in (self.size, self.colour) if word is not None]
        return " ".join(words + [noun + ("s" if plural else "")])


@dataclass(frozen=True)
class ReferringExpression:
    """An expression, the ids of the objects it picks out in answer order, and for each of them the attributes that
    its own noun phrase names (`named`: "the red cube left of the sphere" names colour and shape of its one object;
    "the object nearest the camera" names none)."""

    text: str
    object_ids: tuple[int, ...]
    kind: str
    named: tuple[ObjectQuery, ...]


def _queries_for(obj: SceneObject) -> list[ObjectQuery]:
    """Every attribute query that `obj` satisfies, most general first."""
    queries = []
    for use_size, use_colour, use_shape in itertools.product((False, True), repeat=3):
        if use_size or use_colour or use_shape:
            queries.append(
                ObjectQuery(
                    size=obj.size if use_size else None,
                    colour=obj.colour if use_colour else None,
                    shape=obj.shape if use_shape else None,
                )
            )
    return sorted(
        queries, key=lambda query: sum(value is not None for value in (query.size, query.colour, query.shape))
    )


def _matching(objects: list[SceneObject], query: ObjectQuery) -> list[SceneObject]:
    return [obj for obj in objects if query.matches(obj)]


def _shortest_unique_query(
    obj: SceneObject, objects: list[SceneObject], with_shape: bool = True
) -> ObjectQuery | None:
    for query in _queries_for(obj):
        if (query.shape is not None or not with_shape) and _matching(objects, query) == [obj]:
            return query
    return None


def _left_to_right(objects: list[SceneObject]) -> tuple[int, ...]:
    return tuple(obj.object_id for obj in sorted(objects, key=lambda obj: obj.centroid[0]))


def _attribute_expressions(objects: list[SceneObject]) -> list[ReferringExpression]:
    expressions = []
    for obj in objects:
        for query in _queries_for(obj):
            if _matching(objects, query) == [obj]:
                expressions.append(
                    ReferringExpression(f"the {query.phrase()}", (obj.object_id,), "attributes", (query,))
                )
    return expressions


def _extreme_by_distance(candidates: list[SceneObject], margin: float, nearest: bool) -> SceneObject | None:
    """The nearest (or farthest) candidate when it beats the runner-up by the relative margin."""
    if len(candidates) < 2:
        return None
    ordered = sorted(candidates, key=lambda obj: obj.distance, reverse=not nearest)
    first, second = ordered[0].distance, ordered[1].distance
    clear = second >= first * (1 + margin) if nearest else first >= second * (1 + margin)
    return ordered[0] if clear else None


def _superlative_expressions(objects: list[SceneObject], config: TaskConfig) -> list[ReferringExpression]:
    expressions = []
    groups = [(ObjectQuery(), objects)]
    groups += [(query, _matching(objects, query)) for query in {q for obj in objects for q in _queries_for(obj)}]
    for query, members in sorted(groups, key=lambda item: item[0].phrase()):
        for nearest, wording in ((True, "nearest the camera"), (False, "farthest from the camera")):
            chosen = _extreme_by_distance(members, config.distance_margin, nearest)
            if chosen is not None:
                text = f"the {query.phrase()} {wording}"
                expressions.append(ReferringExpression(text, (chosen.object_id,), "superlative", (query,)))
    return expressions


def _relation_expressions(
    objects: list[SceneObject], image_width: int, config: TaskConfig
) -> list[ReferringExpression]:
    """ "the X left of the Y": X alone is ambiguous, Y is unique, and exactly one X is clearly on that side."""
    margin = config.left_right_margin * image_width
    expressions = []
    target_queries = sorted(
        {q for obj in objects for q in _queries_for(obj) if q.shape is not None}, key=ObjectQuery.phrase
    )
    for reference in objects:
        reference_query = _shortest_unique_query(reference, objects)
        if reference_query is None:
            continue
        for query in target_queries:
            candidates = [obj for obj in _matching(objects, query) if obj is not reference]
            if len(candidates) < 2:
                continue
            offsets = [obj.centroid[0] - reference.centroid[0] for obj in candidates]
            if any(abs(offset) < margin for offset in offsets):
                continue
            for side, on_side in (("left of", lambda offset: offset < 0), ("right of", lambda offset: offset > 0)):
                chosen = [obj for obj, offset in zip(candidates, offsets) if on_side(offset)]
                if len(chosen) == 1:
                    text = f"the {query.phrase()} {side} the {reference_query.phrase()}"
                    expressions.append(ReferringExpression(text, (chosen[0].object_id,), "relation", (query,)))
    return expressions


def _plural_expressions(objects: list[SceneObject]) -> list[ReferringExpression]:
    expressions = []
    for query in sorted({q for obj in objects for q in _queries_for(obj)}, key=ObjectQuery.phrase):
        members = _matching(objects, query)
        if len(members) >= 2:
            expressions.append(
                ReferringExpression(
                    f"all the {query.phrase(plural=True)}",
                    _left_to_right(members),
                    "plural",
                    (query,) * len(members),
                )
            )
    return expressions


def _conjunction_expressions(objects: list[SceneObject]) -> list[ReferringExpression]:
    unique = [(obj, _shortest_unique_query(obj, objects)) for obj in objects]
    unique = [(obj, query) for obj, query in unique if query is not None]
    return [
        ReferringExpression(
            f"the {first_query.phrase()} and the {second_query.phrase()}",
            (first.object_id, second.object_id),
            "conjunction",
            (first_query, second_query),
        )
        for (first, first_query), (second, second_query) in itertools.permutations(unique, 2)
    ]


def _visible_objects(scene: SceneRender) -> list[SceneObject]:
    return [obj for obj in scene.objects if obj.visible_pixels > 0]


def referring_expressions(scene: SceneRender, config: TaskConfig = DEFAULT_TASK_CONFIG) -> list[ReferringExpression]:
    """Every unambiguous referring expression of the scene, grouped by kind (attributes, superlative, relation,
    plural, conjunction). Plural answers list objects left to right; conjunctions in the order named."""
    objects = _visible_objects(scene)
    return (
        _attribute_expressions(objects)
        + _superlative_expressions(objects, config)
        + _relation_expressions(objects, scene.image_size[1], config)
        + _plural_expressions(objects)
        + _conjunction_expressions(objects)
    )


def referred_object_facts(objects: list[SceneObject], object_ids: tuple[int, ...]) -> list[dict[str, object]]:
    """Per referred object (in `object_ids` order), what it is and where, whatever its phrase names: its `size`,
    `colour`, `shape`, `nearness_rank` (0 = nearest the camera among `objects`) and `column_rank` (0 = leftmost)."""
    nearness = [obj.object_id for obj in sorted(objects, key=lambda obj: obj.distance)]
    columns = list(_left_to_right(objects))
    by_id = {obj.object_id: obj for obj in objects}
    return [
        {
            "size": by_id[object_id].size,
            "colour": by_id[object_id].colour,
            "shape": by_id[object_id].shape,
            "nearness_rank": nearness.index(object_id),
            "column_rank": columns.index(object_id),
        }
        for object_id in object_ids
    ]


def _empty_masks(scene: SceneRender) -> np.ndarray:
    return np.zeros((0, *scene.image_size), dtype=bool)


def _wants_depth_block(rng: np.random.Generator, config: TaskConfig) -> bool:
    return bool(rng.random() < config.depth_block_share)


def make_referring_sample(
    scene: SceneRender, rng: np.random.Generator, config: TaskConfig = DEFAULT_TASK_CONFIG
) -> TaskSample | None:
    """A referring-segmentation question; the kind of expression is drawn first so every kind is well represented."""
    expressions = referring_expressions(scene, config)
    if not expressions:
        return None
    kinds = sorted({expression.kind for expression in expressions})
    kind = kinds[int(rng.integers(len(kinds)))]
    of_kind = [expression for expression in expressions if expression.kind == kind]
    expression = of_kind[int(rng.integers(len(of_kind)))]
    prompt = REFERRING_PROMPTS[int(rng.integers(len(REFERRING_PROMPTS)))].format(expression=expression.text)
    answer = REFERRING_ANSWER_SINGLE if len(expression.object_ids) == 1 else REFERRING_ANSWER_PLURAL
    return TaskSample(
        task="referring",
        prompt=prompt,
        answer=answer,
        image=scene.image,
        masks=scene.instance_masks[list(expression.object_ids)],
        use_depth_block=_wants_depth_block(rng, config),
        meta={
            "expression": expression.text,
            "kind": kind,
            "object_ids": list(expression.object_ids),
            "named": [asdict(query) for query in expression.named],
            "referred": referred_object_facts(_visible_objects(scene), expression.object_ids),
        },
    )


@functools.lru_cache(maxsize=1)
def _label_font() -> ImageFont.ImageFont:
    """PIL's built-in bitmap font: no font file is needed."""
    return ImageFont.load_default_imagefont()


@dataclass(frozen=True)
class _PointMarker:
    x: int
    y: int
    radius: int
    label_box: tuple[int, int, int, int]

    @property
    def marker_box(self) -> tuple[int, int, int, int]:
        return (self.x - self.radius, self.y - self.radius, self.x + self.radius, self.y + self.radius)

    def overlaps(self, other: "_PointMarker", padding: int) -> bool:
        return any(
            _boxes_overlap(mine, theirs, padding)
            for mine in (self.marker_box, self.label_box)
            for theirs in (other.marker_box, other.label_box)
        )


def _boxes_overlap(first: tuple[int, int, int, int], second: tuple[int, int, int, int], padding: int) -> bool:
    return not (
        first[2] + padding < second[0]
        or second[2] + padding < first[0]
        or first[3] + padding < second[1]
        or second[3] + padding < first[1]
    )


def _label_size() -> tuple[int, int]:
    left, top, right, bottom = _label_font().getbbox("W")
    return right - left + 2, bottom - top + 2


def _place_marker(x: int, y: int, radius: int, image_size: tuple[int, int]) -> _PointMarker | None:
    """Marker at (x, y) with its label above it to the right (or to the left near the right edge); None when
    the marker or its label would leave the image."""
    height, width = image_size
    if not (radius <= x < width - radius and radius <= y < height - radius):
        return None
    label_width, label_height = _label_size()
    top = y - radius - label_height
    for left in (x + radius, x - radius - label_width):
        box = (left, top, left + label_width - 1, top + label_height - 1)
        if box[0] >= 0 and box[1] >= 0 and box[2] < width:
            return _PointMarker(x=x, y=y, radius=radius, label_box=box)
    return None


def _smooth_surface_mask(depth: np.ndarray, radius: int, tolerance: float) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood has relative depth spread <= tolerance (False near the border)."""
    windows = np.lib.stride_tricks.sliding_window_view(depth, (2 * radius + 1, 2 * radius + 1))
    spread = windows.max(axis=(2, 3)) / windows.min(axis=(2, 3)) - 1.0
    smooth = np.zeros(depth.shape, dtype=bool)
    smooth[radius : depth.shape[0] - radius, radius : depth.shape[1] - radius] = spread <= tolerance
    return smooth


def _draw_point_candidate(
    rng: np.random.Generator, scene: SceneRender, allowed: np.ndarray, config: TaskConfig
) -> tuple[int, int] | None:
    """A random allowed pixel (x, y), on an object with probability `object_point_probability`."""
    visible = [index for index, obj in enumerate(scene.objects) if obj.visible_pixels > 0]
    region = allowed
    if visible and rng.random() < config.object_point_probability:
        region = allowed & scene.instance_masks[visible[int(rng.integers(len(visible)))]]
    rows, cols = np.nonzero(region)
    if len(rows) == 0:
        return None
    pick = int(rng.integers(len(rows)))
    return int(cols[pick]), int(rows[pick])


def _sample_point_markers(
    rng: np.random.Generator, scene: SceneRender, num_points: int, radius: int, allowed: np.ndarray, config: TaskConfig
) -> list[_PointMarker] | None:
    markers: list[_PointMarker] = []
    for _ in range(config.max_point_tries):
        if len(markers) == num_points:
            break
        candidate = _draw_point_candidate(rng, scene, allowed, config)
        if candidate is None:
            return None
        marker = _place_marker(candidate[0], candidate[1], radius, scene.image_size)
        if marker is not None and not any(marker.overlaps(other, padding=1) for other in markers):
            markers.append(marker)
    return markers if len(markers) == num_points else None


def _has_single_closest(depths: np.ndarray, margin: float) -> bool:
    ordered = np.sort(depths)
    return bool(ordered[1] >= ordered[0] * (1 + margin))


def _draw_markers(image: np.ndarray, markers: list[_PointMarker], letters: str) -> np.ndarray:
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    font = _label_font()
    for marker, letter in zip(markers, letters):
        background = _LABEL_BACKGROUNDS[POINT_LETTERS.index(letter)]
        draw.ellipse(marker.marker_box, fill=_MARKER_FILL, outline=_MARKER_OUTLINE)
        draw.rectangle(marker.label_box, fill=background)
        text_origin = (marker.label_box[0] + 1, marker.label_box[1] + 1)
        draw.text(text_origin, letter, fill=_label_text_colour(background), font=font)
    return np.asarray(canvas)


def make_relative_depth_sample(
    scene: SceneRender,
    rng: np.random.Generator,
    config: TaskConfig = DEFAULT_TASK_CONFIG,
    num_points: int | None = None,
) -> TaskSample | None:
    """A HardBLINK-style question with `num_points` marked points (drawn from `point_count_range` when None).

    Returns None when no point set with a single clearly closest point fits on this scene.
    """
    low, high = config.point_count_range
    if num_points is None:
        num_points = int(rng.integers(low, high + 1))
    elif not isinstance(num_points, (int, np.integer)) or not 2 <= num_points <= len(POINT_LETTERS):
        raise ValueError(f"num_points must be an int in [2, {len(POINT_LETTERS)}], got {num_points!r}")
    radius = max(config.min_marker_radius, round(config.marker_radius_fraction * min(scene.image_size)))
    allowed = _smooth_surface_mask(scene.depth, radius, config.surface_smoothness)
    for _ in range(config.max_point_set_attempts):
        markers = _sample_point_markers(rng, scene, num_points, radius, allowed, config)
        if markers is None:
            continue
        depths = np.array([scene.depth[marker.y, marker.x] for marker in markers], dtype=np.float64)
        if not _has_single_closest(depths, config.depth_margin):
            continue
        letters = POINT_LETTERS[:num_points]
        correct = letters[int(np.argmin(depths))]
        choices = "\n".join(f"({letter}) Point {letter}" for letter in letters)
        return TaskSample(
            task="relative_depth",
            prompt=f"{RELATIVE_DEPTH_QUESTION}\nSelect from the following choices.\n{choices}",
            answer=f"({correct})",
            image=_draw_markers(scene.image, markers, letters),
            masks=_empty_masks(scene),
            use_depth_block=True,
            meta={
                "points": [[marker.x, marker.y] for marker in markers],
                "letters": list(letters),
                "metric_depths": [float(value) for value in depths],
                "answer_letter": correct,
                "num_points": num_points,
                "marker_radius": radius,
            },
        )
    return None


def make_count_sample(
    scene: SceneRender, rng: np.random.Generator, config: TaskConfig = DEFAULT_TASK_CONFIG
) -> TaskSample | None:
    """ "How many ... are there?" over all objects, a shape, a colour, or a size and shape (zero is a valid count)."""
    objects = _visible_objects(scene)
    example = objects[int(rng.integers(len(objects)))]
    if rng.random() < config.count_random_query_share:
        example_shape = SHAPES[int(rng.integers(len(SHAPES)))]
        example_colour = tuple(COLOUR_PALETTE)[int(rng.integers(len(COLOUR_PALETTE)))]
        example_size = SIZE_NAMES[int(rng.integers(len(SIZE_NAMES)))]
    else:
        example_shape, example_colour, example_size = example.shape, example.colour, example.size
    options = (
        ObjectQuery(),
        ObjectQuery(shape=example_shape),
        ObjectQuery(colour=example_colour),
        ObjectQuery(size=example_size, shape=example_shape),
        ObjectQuery(colour=example_colour, shape=example_shape),
    )
    query = options[int(rng.integers(len(options)))]
    members = _matching(objects, query)
    return TaskSample(
        task="vqa_count",
        prompt=f"How many {query.phrase(plural=True)} are there?",
        answer=str(len(members)),
        image=scene.image,
        masks=_empty_masks(scene),
        use_depth_block=_wants_depth_block(rng, config),
        meta={
            "query": {"size": query.size, "colour": query.colour, "shape": query.shape},
            "count": len(members),
            "object_ids": [obj.object_id for obj in members],
        },
    )


def _unique_phrases_without(objects: list[SceneObject], attribute: str) -> list[tuple[SceneObject, ObjectQuery]]:
    """(object, query) pairs where a query that omits `attribute` picks out exactly that object."""
    pairs = []
    for obj in objects:
        for query in _queries_for(obj):
            if getattr(query, attribute) is None and _matching(objects, query) == [obj]:
                pairs.append((obj, query))
    return pairs


def _make_attribute_question(
    scene: SceneRender, rng: np.random.Generator, config: TaskConfig, attribute: str, task: str, template: str
) -> TaskSample | None:
    objects = _visible_objects(scene)
    pairs = _unique_phrases_without(objects, attribute)
    if not pairs:
        return None
    obj, query = pairs[int(rng.integers(len(pairs)))]
    value = getattr(obj, attribute)
    return TaskSample(
        task=task,
        prompt=template.format(phrase=query.phrase()),
        answer=value.capitalize(),
        image=scene.image,
        masks=_empty_masks(scene),
        use_depth_block=_wants_depth_block(rng, config),
        meta={"object_id": obj.object_id, attribute: value, "phrase": query.phrase()},
    )


def make_colour_sample(
    scene: SceneRender, rng: np.random.Generator, config: TaskConfig = DEFAULT_TASK_CONFIG
) -> TaskSample | None:
    """ "What colour is the cube?" when a colour-free phrase picks out one object; None otherwise."""
    return _make_attribute_question(scene, rng, config, "colour", "vqa_colour", "What colour is the {phrase}?")


def make_shape_sample(
    scene: SceneRender, rng: np.random.Generator, config: TaskConfig = DEFAULT_TASK_CONFIG
) -> TaskSample | None:
    """ "What shape is the red object?" when a shape-free phrase picks out one object; None otherwise."""
    return _make_attribute_question(scene, rng, config, "shape", "vqa_shape", "What shape is the {phrase}?")


TASK_BUILDERS: dict[str, Callable[..., TaskSample | None]] = {
    "referring": make_referring_sample,
    "relative_depth": make_relative_depth_sample,
    "vqa_count": make_count_sample,
    "vqa_colour": make_colour_sample,
    "vqa_shape": make_shape_sample,
}


def generate_task_sample(
    scene: SceneRender, task: str, rng: np.random.Generator, config: TaskConfig = DEFAULT_TASK_CONFIG
) -> TaskSample | None:
    """Pose `task` on `scene`; None when this scene admits no unambiguous question of that task.

    A sample that carries a depth block without being a depth question asks for it in its prompt
    (`DEPTH_REQUEST`), so the model can learn when to write one.
    """
    if task not in TASK_BUILDERS:
        raise ValueError(f"task must be one of {TASK_NAMES}, got {task!r}")
    if not isinstance(scene, SceneRender):
        raise ValueError(f"scene must be a SceneRender, got {type(scene).__name__}")
    sample = TASK_BUILDERS[task](scene, rng, config)
    if sample is not None and sample.use_depth_block and sample.task != "relative_depth":
        sample.prompt = f"{sample.prompt} {DEPTH_REQUEST}"
    return sample
