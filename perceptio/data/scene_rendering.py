"""Procedural 3D scenes ray-cast with numpy, so depth and instance masks are exact.

A scene is a ground plane, a back wall that closes it (every pixel has a finite depth, there is no sky) and a few
spheres, cubes and cylinders resting on the ground. Each pixel casts one ray through its centre; the nearest hit
gives the pixel's metric depth, its instance id and its shading (Lambertian + ambient, with cast shadows).
No anti-aliasing: a pixel belongs to exactly one surface, so masks and depth agree pixel for pixel.

Frames: the world has x to the right, y forward and z up, with the ground at z = 0 and the back wall at
y = `wall_distance`. The camera frame follows OpenCV (x right, y down, z along the optical axis); `depth` is the
z-depth along the optical axis, not the distance along the ray. Pixel (row, col) looks through the image point
(col + 0.5, row + 0.5).

`render_scene(seed, ...)` samples a random scene and renders it; `render(scene_spec, camera, image_size)` renders
a scene given explicitly (used by tests to check analytic cases).
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np


SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder")
SIZE_NAMES: tuple[str, ...] = ("small", "large")

# Saturated, well separated colours, so a colour name is never in doubt; the background uses muted tones only.
COLOUR_PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.10),
    "green": (0.15, 0.65, 0.20),
    "blue": (0.12, 0.28, 0.88),
    "yellow": (0.95, 0.85, 0.12),
    "purple": (0.55, 0.20, 0.75),
    "cyan": (0.10, 0.78, 0.82),
    "orange": (0.98, 0.50, 0.05),
}

TEXTURE_KINDS: tuple[str, ...] = ("plain", "checker", "stripes", "waves")

# Rays only count hits this far along them, so a shadow ray does not hit the surface it starts on.
_HIT_EPSILON = 1e-6
_SHADOW_RAY_OFFSET = 1e-4


@dataclass(frozen=True)
class SurfaceTexture:
    """A procedural texture: `base_rgb` and `accent_rgb` blended by a pattern of period `scale` metres."""

    kind: str = "plain"
    base_rgb: tuple[float, float, float] = (0.6, 0.6, 0.6)
    accent_rgb: tuple[float, float, float] = (0.5, 0.5, 0.5)
    scale: float = 1.0
    angle: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in TEXTURE_KINDS:
            raise ValueError(f"texture kind must be one of {TEXTURE_KINDS}, got {self.kind!r}")
        if not self.scale > 0:
            raise ValueError(f"texture scale must be > 0 metres, got {self.scale}")
        for name in ("base_rgb", "accent_rgb"):
            _validate_rgb(getattr(self, name), name)

    def colour_at(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Albedo (P, 3) at surface coordinates `u`, `v` (metres along the surface)."""
        cos_a, sin_a = math.cos(self.angle), math.sin(self.angle)
        s = (cos_a * u + sin_a * v) / self.scale
        t = (-sin_a * u + cos_a * v) / self.scale
        if self.kind == "plain":
            weight = np.zeros_like(s)
        elif self.kind == "checker":
            weight = ((np.floor(s) + np.floor(t)) % 2).astype(np.float64)
        elif self.kind == "stripes":
            weight = (np.floor(2 * s) % 2).astype(np.float64)
        else:
            weight = 0.5 + 0.5 * np.sin(2 * np.pi * s) * np.sin(2 * np.pi * t)
        base, accent = np.asarray(self.base_rgb), np.asarray(self.accent_rgb)
        return base[None, :] * (1 - weight[:, None]) + accent[None, :] * weight[:, None]


@dataclass(frozen=True)
class Lighting:
    """One directional light plus ambient light; `direction` points from the scene towards the light."""

    direction: tuple[float, float, float] = (0.3, -0.5, 0.8)
    ambient: float = 0.35
    cast_shadows: bool = True

    def __post_init__(self) -> None:
        direction = np.asarray(self.direction, dtype=np.float64)
        if direction.shape != (3,) or not np.all(np.isfinite(direction)) or np.linalg.norm(direction) == 0:
            raise ValueError(f"light direction must be a finite non-zero 3-vector, got {self.direction!r}")
        if not 0.0 <= self.ambient <= 1.0:
            raise ValueError(f"ambient light must be in [0, 1], got {self.ambient}")

    def unit_direction(self) -> np.ndarray:
        """The light direction normalised to length 1."""
        direction = np.asarray(self.direction, dtype=np.float64)
        return direction / np.linalg.norm(direction)


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a scene.

    `radius` is the radius of a sphere or cylinder and half the edge of a cube; `half_height` is a cylinder's half
    height (defaults to `radius`); `yaw` rotates cubes about the vertical axis (radians). `size` is the object's
    size name ("small" or "large") used by the tasks.
    """

    shape: str
    colour: str
    centre: tuple[float, float, float]
    radius: float
    size: str = "large"
    half_height: float | None = None
    yaw: float = 0.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"object shape must be one of {SHAPES}, got {self.shape!r}")
        if self.colour not in COLOUR_PALETTE:
            raise ValueError(f"object colour must be one of {tuple(COLOUR_PALETTE)}, got {self.colour!r}")
        if self.size not in SIZE_NAMES:
            raise ValueError(f"object size must be one of {SIZE_NAMES}, got {self.size!r}")
        centre = np.asarray(self.centre, dtype=np.float64)
        if centre.shape != (3,) or not np.all(np.isfinite(centre)):
            raise ValueError(f"object centre must be a finite (x, y, z) triple, got {self.centre!r}")
        if not self.radius > 0:
            raise ValueError(f"object radius must be > 0, got {self.radius}")
        if self.half_height is not None and not self.half_height > 0:
            raise ValueError(f"cylinder half_height must be > 0, got {self.half_height}")

    @property
    def vertical_half_extent(self) -> float:
        """Half of the object's height: its centre's height when it rests on the ground."""
        if self.shape == "cylinder" and self.half_height is not None:
            return self.half_height
        return self.radius

    @property
    def footprint_radius(self) -> float:
        """Radius of the smallest vertical cylinder around the object, used to keep objects apart."""
        return self.radius * math.sqrt(2.0) if self.shape == "cube" else self.radius


@dataclass(frozen=True)
class SceneSpec:
    """Everything `render` needs besides the camera: objects, back wall, background textures and light."""

    objects: tuple[ObjectSpec, ...]
    wall_distance: float = 12.0
    ground_texture: SurfaceTexture = field(default_factory=SurfaceTexture)
    wall_texture: SurfaceTexture = field(default_factory=lambda: SurfaceTexture(base_rgb=(0.7, 0.7, 0.68)))
    lighting: Lighting = field(default_factory=Lighting)

    def __post_init__(self) -> None:
        if not all(isinstance(obj, ObjectSpec) for obj in self.objects):
            raise ValueError("scene objects must all be ObjectSpec instances")
        if not (math.isfinite(self.wall_distance) and self.wall_distance > 0):
            raise ValueError(f"wall_distance must be a finite positive number, got {self.wall_distance}")


@dataclass(frozen=True)
class Camera:
    """A pinhole camera at `position`, looking along +y and tilted down by `tilt` radians.

    `vertical_fov` is the full vertical field of view in radians; pixels are square, so wider images see more
    horizontally.
    """

    position: tuple[float, float, float] = (0.0, 0.0, 1.6)
    tilt: float = math.radians(20.0)
    vertical_fov: float = math.radians(50.0)

    def __post_init__(self) -> None:
        position = np.asarray(self.position, dtype=np.float64)
        if position.shape != (3,) or not np.all(np.isfinite(position)):
            raise ValueError(f"camera position must be a finite (x, y, z) triple, got {self.position!r}")
        if not -math.pi / 2 < self.tilt < math.pi / 2:
            raise ValueError(f"camera tilt must be in (-pi/2, pi/2) radians, got {self.tilt}")
        if not 0 < self.vertical_fov < math.pi:
            raise ValueError(f"camera vertical_fov must be in (0, pi) radians, got {self.vertical_fov}")

    def basis(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World-frame unit vectors (right, down, forward) of the camera's x, y, z axes."""
        cos_t, sin_t = math.cos(self.tilt), math.sin(self.tilt)
        right = np.array([1.0, 0.0, 0.0])
        forward = np.array([0.0, cos_t, -sin_t])
        down = np.array([0.0, -sin_t, -cos_t])
        return right, down, forward

    def focal_length(self, height: int) -> float:
        """Focal length in pixels for an image `height` pixels tall."""
        return (height / 2.0) / math.tan(self.vertical_fov / 2.0)

    def intrinsics(self, image_size: int | tuple[int, int]) -> np.ndarray:
        """The 3x3 pinhole matrix K for `image_size` ((H, W) or a side), principal point at the image centre."""
        height, width = normalise_image_size(image_size)
        focal = self.focal_length(height)
        return np.array([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]])

    def extrinsics(self) -> np.ndarray:
        """The 4x4 world-to-camera transform (OpenCV camera frame)."""
        rotation = np.stack(self.basis())
        transform = np.eye(4)
        transform[:3, :3] = rotation
        transform[:3, 3] = -rotation @ np.asarray(self.position, dtype=np.float64)
        return transform

    def ray_directions(self, image_size: int | tuple[int, int]) -> np.ndarray:
        """World-frame ray directions (H*W, 3) through every pixel centre, scaled so their z-depth step is 1.

        With this scaling the ray parameter t of a hit equals its z-depth along the optical axis.
        """
        height, width = normalise_image_size(image_size)
        focal = self.focal_length(height)
        x_normalised = (np.arange(width) + 0.5 - width / 2.0) / focal
        y_normalised = (np.arange(height) + 0.5 - height / 2.0) / focal
        right, down, forward = self.basis()
        directions = (
            forward[None, None, :]
            + x_normalised[None, :, None] * right[None, None, :]
            + y_normalised[:, None, None] * down[None, None, :]
        )
        return directions.reshape(-1, 3)

    def project(self, points: np.ndarray, image_size: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Project world points (N, 3) to pixel coordinates (N, 2) as (x, y) and return them with their z-depth."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        camera_points = (self.extrinsics() @ np.concatenate([points, np.ones((len(points), 1))], axis=1).T).T
        depth = camera_points[:, 2]
        pixels = (self.intrinsics(image_size) @ camera_points[:, :3].T).T
        return pixels[:, :2] / depth[:, None], depth


@dataclass(frozen=True)
class SceneObject:
    """One rendered object and what the tasks need to know about it.

    `distance` is the Euclidean distance in metres from the camera centre to the object's 3D centre;
    `centroid` is the mean (x, y) = (column, row) pixel index of its visible pixels (None when fully hidden).
    """

    object_id: int
    shape: str
    colour: str
    size: str
    centre: tuple[float, float, float]
    distance: float
    visible_pixels: int
    centroid: tuple[float, float] | None

    @property
    def description(self) -> str:
        """The full attribute phrase, e.g. "small red sphere"."""
        return f"{self.size} {self.colour} {self.shape}"


@dataclass
class SceneRender:
    """A rendered scene.

    `image` is uint8 (H, W, 3); `depth` float32 (H, W) metric z-depth along the optical axis (finite, > 0);
    `instance_masks` bool (N, H, W), one mask of visible pixels per object, in `objects` order; `intrinsics`
    (3x3) and `extrinsics` (4x4 world-to-camera) describe `camera` at this image size.
    """

    image: np.ndarray
    depth: np.ndarray
    instance_masks: np.ndarray
    objects: list[SceneObject]
    camera: Camera
    intrinsics: np.ndarray
    extrinsics: np.ndarray
    spec: SceneSpec
    seed: int | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the render."""
        return self.depth.shape


@dataclass(frozen=True)
class SceneSamplingConfig:
    """Ranges from which `render_scene` draws a random scene (lengths in metres, angles in degrees)."""

    min_objects: int = 2
    max_objects: int = 6
    camera_height_range: tuple[float, float] = (1.3, 2.6)
    camera_tilt_degrees_range: tuple[float, float] = (14.0, 32.0)
    vertical_fov_degrees_range: tuple[float, float] = (45.0, 60.0)
    wall_distance_range: tuple[float, float] = (11.0, 16.0)
    small_radius_range: tuple[float, float] = (0.22, 0.32)
    large_radius_range: tuple[float, float] = (0.45, 0.6)
    cylinder_half_height_ratio_range: tuple[float, float] = (0.8, 1.4)
    ambient_range: tuple[float, float] = (0.25, 0.45)
    texture_scale_range: tuple[float, float] = (0.4, 1.5)
    # Objects are placed by picking their ground contact point through a normalised image position.
    placement_x_range: tuple[float, float] = (0.08, 0.92)
    placement_y_range: tuple[float, float] = (0.55, 0.95)
    object_gap: float = 0.1
    wall_clearance: float = 1.0
    min_visible_fraction_of_image: float = 0.002
    min_visible_fraction_of_object: float = 0.3
    max_placement_tries: int = 40
    layouts_per_camera: int = 10
    max_layout_attempts: int = 200


DEFAULT_SAMPLING_CONFIG = SceneSamplingConfig()


def normalise_image_size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    """Return (H, W) from a side length or an (H, W) pair; raise ValueError unless both are integers >= 8."""
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        size = (int(image_size), int(image_size))
    elif (
        isinstance(image_size, (tuple, list))
        and len(image_size) == 2
        and all(isinstance(side, (int, np.integer)) and not isinstance(side, bool) for side in image_size)
    ):
        size = (int(image_size[0]), int(image_size[1]))
    else:
        raise ValueError(f"image_size must be an int or an (H, W) pair of ints, got {image_size!r}")
    if min(size) < 8:
        raise ValueError(f"image_size sides must be at least 8 pixels, got {size}")
    return size


def metric_depth_to_inverse_depth(depth: np.ndarray) -> np.ndarray:
    """Convert metric depth to relative inverse depth 1/z (larger = nearer), the depth tokenizer's convention.

    The result is not normalised: the depth tokenizer normalises each map itself.
    """
    depth = np.asarray(depth, dtype=np.float32)
    if depth.size == 0:
        raise ValueError("depth must be a non-empty array of metric depths")
    if not np.all(np.isfinite(depth)) or not np.all(depth > 0):
        raise ValueError("depth must be finite and > 0 everywhere to be inverted")
    return (1.0 / depth).astype(np.float32)


def _validate_rgb(rgb: tuple[float, float, float], name: str) -> None:
    values = np.asarray(rgb, dtype=np.float64)
    if values.shape != (3,) or not np.all((values >= 0) & (values <= 1)):
        raise ValueError(f"{name} must be three floats in [0, 1], got {rgb!r}")


def _rotate_about_vertical(vectors: np.ndarray, angle: float) -> np.ndarray:
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    rotated = vectors.copy()
    rotated[..., 0] = cos_a * vectors[..., 0] - sin_a * vectors[..., 1]
    rotated[..., 1] = sin_a * vectors[..., 0] + cos_a * vectors[..., 1]
    return rotated


def _intersect_sphere(origins: np.ndarray, directions: np.ndarray, obj: ObjectSpec) -> np.ndarray:
    offset = origins - np.asarray(obj.centre)
    a = np.einsum("ij,ij->i", directions, directions)
    b = 2.0 * np.einsum("ij,ij->i", np.broadcast_to(offset, directions.shape), directions)
    c = np.einsum("ij,ij->i", np.broadcast_to(offset, directions.shape), np.broadcast_to(offset, directions.shape))
    c = c - obj.radius**2
    discriminant = b * b - 4 * a * c
    root = np.sqrt(np.maximum(discriminant, 0.0))
    near = (-b - root) / (2 * a)
    far = (-b + root) / (2 * a)
    t = np.where(near > _HIT_EPSILON, near, far)
    return np.where((discriminant >= 0) & (t > _HIT_EPSILON), t, np.inf)


def _intersect_cube(origins: np.ndarray, directions: np.ndarray, obj: ObjectSpec) -> np.ndarray:
    local_origins = _rotate_about_vertical(
        np.broadcast_to(origins - np.asarray(obj.centre), directions.shape), -obj.yaw
    )
    local_directions = _rotate_about_vertical(directions, -obj.yaw)
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = 1.0 / local_directions
        t_low = (-obj.radius - local_origins) * inverse
        t_high = (obj.radius - local_origins) * inverse
    t_enter = np.nanmax(np.fmin(t_low, t_high), axis=1)
    t_exit = np.nanmin(np.fmax(t_low, t_high), axis=1)
    t = np.where(t_enter > _HIT_EPSILON, t_enter, t_exit)
    return np.where((t_enter <= t_exit) & (t > _HIT_EPSILON), t, np.inf)


def _intersect_cylinder(origins: np.ndarray, directions: np.ndarray, obj: ObjectSpec) -> np.ndarray:
    offset = np.broadcast_to(origins - np.asarray(obj.centre), directions.shape)
    half_height = obj.vertical_half_extent
    a = directions[:, 0] ** 2 + directions[:, 1] ** 2
    b = 2.0 * (offset[:, 0] * directions[:, 0] + offset[:, 1] * directions[:, 1])
    c = offset[:, 0] ** 2 + offset[:, 1] ** 2 - obj.radius**2
    discriminant = b * b - 4 * a * c
    root = np.sqrt(np.maximum(discriminant, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        candidates = [(-b - root) / (2 * a), (-b + root) / (2 * a)]
        side_valid = (discriminant >= 0) & (a > 0)
        hits = []
        for t in candidates:
            z = offset[:, 2] + t * directions[:, 2]
            hits.append(np.where(side_valid & (np.abs(z) <= half_height) & (t > _HIT_EPSILON), t, np.inf))
        for cap_z in (-half_height, half_height):
            t = (cap_z - offset[:, 2]) / directions[:, 2]
            x = offset[:, 0] + t * directions[:, 0]
            y = offset[:, 1] + t * directions[:, 1]
            hits.append(np.where((x * x + y * y <= obj.radius**2) & (t > _HIT_EPSILON), t, np.inf))
    return np.min(np.stack(hits), axis=0)


_INTERSECTORS = {"sphere": _intersect_sphere, "cube": _intersect_cube, "cylinder": _intersect_cylinder}


def _object_normals(points: np.ndarray, obj: ObjectSpec) -> np.ndarray:
    local = points - np.asarray(obj.centre)
    if obj.shape == "sphere":
        normals = local
    elif obj.shape == "cube":
        rotated = _rotate_about_vertical(local, -obj.yaw)
        axis = np.argmax(np.abs(rotated), axis=1)
        local_normals = np.zeros_like(rotated)
        local_normals[np.arange(len(rotated)), axis] = np.sign(rotated[np.arange(len(rotated)), axis])
        normals = _rotate_about_vertical(local_normals, obj.yaw)
    else:
        radial = np.hypot(local[:, 0], local[:, 1])
        on_cap = np.abs(np.abs(local[:, 2]) - obj.vertical_half_extent) < np.abs(radial - obj.radius)
        normals = np.where(
            on_cap[:, None],
            np.stack([np.zeros_like(radial), np.zeros_like(radial), np.sign(local[:, 2])], axis=1),
            np.stack([local[:, 0], local[:, 1], np.zeros_like(radial)], axis=1),
        )
    return normals / np.linalg.norm(normals, axis=1, keepdims=True)


def _background_hits(
    origin: np.ndarray, directions: np.ndarray, wall_distance: float
) -> tuple[np.ndarray, np.ndarray]:
    """Ray parameters of the ground and the back wall (inf where missed)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t_ground = -origin[2] / directions[:, 2]
        t_wall = (wall_distance - origin[1]) / directions[:, 1]
    t_ground = np.where((directions[:, 2] < 0) & (t_ground > _HIT_EPSILON), t_ground, np.inf)
    t_wall = np.where((directions[:, 1] > 0) & (t_wall > _HIT_EPSILON), t_wall, np.inf)
    return t_ground, t_wall


def _trace_objects(origins: np.ndarray, directions: np.ndarray, objects: tuple[ObjectSpec, ...]) -> np.ndarray:
    """Ray parameters (num_objects, P) of every object along every ray (inf where missed)."""
    if not objects:
        return np.full((0, len(directions)), np.inf)
    return np.stack([_INTERSECTORS[obj.shape](origins, directions, obj) for obj in objects])


def _shade(
    spec: SceneSpec,
    points: np.ndarray,
    surface: np.ndarray,
    is_ground: np.ndarray,
) -> np.ndarray:
    """Colour (P, 3) of the visible points: albedo x (ambient + diffuse x unshadowed), surface ids -1 = background."""
    normals = np.zeros_like(points)
    albedo = np.zeros_like(points)
    ground = (surface < 0) & is_ground
    wall = (surface < 0) & ~is_ground
    normals[ground] = (0.0, 0.0, 1.0)
    normals[wall] = (0.0, -1.0, 0.0)
    albedo[ground] = spec.ground_texture.colour_at(points[ground, 0], points[ground, 1])
    albedo[wall] = spec.wall_texture.colour_at(points[wall, 0], points[wall, 2])
    for index, obj in enumerate(spec.objects):
        selected = surface == index
        normals[selected] = _object_normals(points[selected], obj)
        albedo[selected] = COLOUR_PALETTE[obj.colour]
    light = spec.lighting.unit_direction()
    diffuse = np.clip(normals @ light, 0.0, None)
    if spec.lighting.cast_shadows and spec.objects:
        shadow_origins = points + _SHADOW_RAY_OFFSET * normals
        shadow_directions = np.broadcast_to(light, points.shape)
        blocked = np.isfinite(_trace_objects(shadow_origins, shadow_directions, spec.objects)).any(axis=0)
        diffuse = np.where(blocked, 0.0, diffuse)
    ambient = spec.lighting.ambient
    return albedo * (ambient + (1.0 - ambient) * diffuse)[:, None]


@dataclass(frozen=True)
class _PrimaryHits:
    """What the primary rays hit: ray parameters equal z-depths because directions have unit forward component."""

    directions: np.ndarray
    t_nearest: np.ndarray
    surface: np.ndarray
    object_hits: np.ndarray
    t_background: np.ndarray
    is_ground: np.ndarray


def _raycast(spec: SceneSpec, camera: Camera, image_size: tuple[int, int]) -> _PrimaryHits:
    """Trace one ray per pixel; surface id -1 marks the background (ground or wall)."""
    origin = np.asarray(camera.position, dtype=np.float64)
    if not (origin[2] > 0 and origin[1] < spec.wall_distance):
        raise ValueError(
            "the camera must be above the ground (z > 0) and in front of the back wall (y < wall_distance), "
            f"got position {camera.position} with wall_distance {spec.wall_distance}"
        )
    directions = camera.ray_directions(image_size)
    t_ground, t_wall = _background_hits(origin, directions, spec.wall_distance)
    t_background = np.minimum(t_ground, t_wall)
    if not np.all(np.isfinite(t_background)):
        raise ValueError(
            "some pixels see neither the ground nor the back wall: tilt the camera less upwards or narrow its field "
            f"of view (tilt={camera.tilt:.3f} rad, vertical_fov={camera.vertical_fov:.3f} rad)"
        )
    object_hits = _trace_objects(origin[None, :], directions, spec.objects)
    all_hits = np.concatenate([object_hits, t_background[None, :]], axis=0)
    nearest = np.argmin(all_hits, axis=0)
    surface = np.where(nearest == len(spec.objects), -1, nearest)
    return _PrimaryHits(
        directions=directions,
        t_nearest=all_hits[nearest, np.arange(all_hits.shape[1])],
        surface=surface,
        object_hits=object_hits,
        t_background=t_background,
        is_ground=t_ground <= t_wall,
    )


def _describe_objects(spec: SceneSpec, camera: Camera, masks: np.ndarray) -> list[SceneObject]:
    camera_position = np.asarray(camera.position, dtype=np.float64)
    described = []
    for index, (obj, mask) in enumerate(zip(spec.objects, masks)):
        rows, cols = np.nonzero(mask)
        centroid = (float(cols.mean()), float(rows.mean())) if len(rows) else None
        described.append(
            SceneObject(
                object_id=index,
                shape=obj.shape,
                colour=obj.colour,
                size=obj.size,
                centre=tuple(float(value) for value in obj.centre),
                distance=float(np.linalg.norm(np.asarray(obj.centre) - camera_position)),
                visible_pixels=int(len(rows)),
                centroid=centroid,
            )
        )
    return described


def _compose_render(
    spec: SceneSpec, camera: Camera, image_size: tuple[int, int], hits: _PrimaryHits, seed: int | None
) -> SceneRender:
    height, width = image_size
    points = np.asarray(camera.position, dtype=np.float64)[None, :] + hits.t_nearest[:, None] * hits.directions
    colours = _shade(spec, points, hits.surface, hits.is_ground)
    image = np.round(np.clip(colours, 0.0, 1.0) * 255.0).astype(np.uint8).reshape(height, width, 3)
    masks = (hits.surface[None, :] == np.arange(len(spec.objects))[:, None]).reshape(-1, height, width)
    return SceneRender(
        image=image,
        depth=hits.t_nearest.astype(np.float32).reshape(height, width),
        instance_masks=masks,
        objects=_describe_objects(spec, camera, masks),
        camera=camera,
        intrinsics=camera.intrinsics(image_size),
        extrinsics=camera.extrinsics(),
        spec=spec,
        seed=seed,
    )


def render(scene_spec: SceneSpec, camera: Camera, image_size: int | tuple[int, int] = 256) -> SceneRender:
    """Ray-cast `scene_spec` seen by `camera` at `image_size` ((H, W) or a side).

    Objects may be placed anywhere (they need not rest on the ground); an object hidden from view gets an empty
    mask and `centroid=None`.
    """
    if not isinstance(scene_spec, SceneSpec):
        raise ValueError(f"scene_spec must be a SceneSpec, got {type(scene_spec).__name__}")
    if not isinstance(camera, Camera):
        raise ValueError(f"camera must be a Camera, got {type(camera).__name__}")
    size = normalise_image_size(image_size)
    return _compose_render(scene_spec, camera, size, _raycast(scene_spec, camera, size), seed=None)


def _sample_range(rng: np.random.Generator, value_range: tuple[float, float]) -> float:
    return float(rng.uniform(value_range[0], value_range[1]))


def _sample_camera(rng: np.random.Generator, config: SceneSamplingConfig) -> Camera:
    return Camera(
        position=(0.0, 0.0, _sample_range(rng, config.camera_height_range)),
        tilt=math.radians(_sample_range(rng, config.camera_tilt_degrees_range)),
        vertical_fov=math.radians(_sample_range(rng, config.vertical_fov_degrees_range)),
    )


def _sample_texture(
    rng: np.random.Generator, config: SceneSamplingConfig, grey_range: tuple[float, float]
) -> SurfaceTexture:
    """A muted (low-saturation) texture, so the background never looks like a named object colour."""
    grey = _sample_range(rng, grey_range)
    tint = rng.uniform(-0.06, 0.06, size=3)
    base = np.clip(grey + tint, 0.0, 1.0)
    accent = np.clip(base * rng.uniform(0.7, 0.88), 0.0, 1.0)
    return SurfaceTexture(
        kind=TEXTURE_KINDS[int(rng.integers(len(TEXTURE_KINDS)))],
        base_rgb=tuple(float(value) for value in base),
        accent_rgb=tuple(float(value) for value in accent),
        scale=_sample_range(rng, config.texture_scale_range),
        angle=float(rng.uniform(0.0, math.pi)),
    )


def _sample_lighting(rng: np.random.Generator, config: SceneSamplingConfig) -> Lighting:
    # The light sits above and on the camera's side of the scene, so the back wall is lit.
    direction = (float(rng.uniform(-1.0, 1.0)), float(rng.uniform(-1.0, -0.2)), float(rng.uniform(0.7, 1.6)))
    return Lighting(direction=direction, ambient=_sample_range(rng, config.ambient_range))


def _ground_point_through(camera: Camera, image_x: float, image_y: float, aspect: float) -> np.ndarray | None:
    """Ground point seen through the normalised image position (x, y) in [0, 1]^2; None above the horizon."""
    half_height = math.tan(camera.vertical_fov / 2.0)
    right, down, forward = camera.basis()
    direction = forward + (2 * image_x - 1) * half_height * aspect * right + (2 * image_y - 1) * half_height * down
    if direction[2] >= 0:
        return None
    origin = np.asarray(camera.position, dtype=np.float64)
    return origin + (-origin[2] / direction[2]) * direction


def _sample_object_attributes(rng: np.random.Generator, config: SceneSamplingConfig) -> dict:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = tuple(COLOUR_PALETTE)[int(rng.integers(len(COLOUR_PALETTE)))]
    size = SIZE_NAMES[int(rng.integers(len(SIZE_NAMES)))]
    radius = _sample_range(rng, config.small_radius_range if size == "small" else config.large_radius_range)
    half_height = radius * _sample_range(rng, config.cylinder_half_height_ratio_range) if shape == "cylinder" else None
    yaw = float(rng.uniform(0.0, math.pi / 2)) if shape == "cube" else 0.0
    return {"shape": shape, "colour": colour, "size": size, "radius": radius, "half_height": half_height, "yaw": yaw}


def _sample_layout(
    rng: np.random.Generator,
    camera: Camera,
    num_objects: int,
    wall_distance: float,
    aspect: float,
    config: SceneSamplingConfig,
) -> tuple[ObjectSpec, ...] | None:
    """Place `num_objects` non-overlapping objects on the visible ground; None when one does not fit."""
    placed: list[ObjectSpec] = []
    for _ in range(num_objects):
        attributes = _sample_object_attributes(rng, config)
        for _ in range(config.max_placement_tries):
            contact = _ground_point_through(
                camera,
                _sample_range(rng, config.placement_x_range),
                _sample_range(rng, config.placement_y_range),
                aspect,
            )
            if contact is None:
                continue
            height = attributes["half_height"] if attributes["shape"] == "cylinder" else attributes["radius"]
            candidate = ObjectSpec(centre=(float(contact[0]), float(contact[1]), float(height)), **attributes)
            if candidate.centre[1] + candidate.footprint_radius > wall_distance - config.wall_clearance:
                continue
            if all(_footprints_apart(candidate, other, config.object_gap) for other in placed):
                placed.append(candidate)
                break
        else:
            return None
    return tuple(placed)


def _footprints_apart(first: ObjectSpec, second: ObjectSpec, gap: float) -> bool:
    separation = math.hypot(first.centre[0] - second.centre[0], first.centre[1] - second.centre[1])
    return separation >= first.footprint_radius + second.footprint_radius + gap


def _layout_is_visible(hits: _PrimaryHits, num_objects: int, num_pixels: int, config: SceneSamplingConfig) -> bool:
    """Every object shows enough pixels, and enough of its own unoccluded silhouette, to be recognised."""
    visible = np.bincount(hits.surface[hits.surface >= 0], minlength=num_objects)
    unoccluded = (hits.object_hits < hits.t_background[None, :]).sum(axis=1)
    min_pixels = max(1, math.ceil(config.min_visible_fraction_of_image * num_pixels))
    return bool(
        np.all(visible >= min_pixels) and np.all(visible >= config.min_visible_fraction_of_object * unoccluded)
    )


def validate_num_objects(num_objects: int | None, config: SceneSamplingConfig = DEFAULT_SAMPLING_CONFIG) -> None:
    """Raise a `ValueError` unless `num_objects` is None (each scene draws its count) or an int in
    [1, `config.max_objects`]."""
    if num_objects is not None and (
        not isinstance(num_objects, (int, np.integer))
        or isinstance(num_objects, bool)
        or not 1 <= num_objects <= config.max_objects
    ):
        raise ValueError(f"num_objects must be an int in [1, {config.max_objects}] or None, got {num_objects!r}")


def render_scene(
    seed: int,
    image_size: int | tuple[int, int] = 256,
    num_objects: int | None = None,
    config: SceneSamplingConfig = DEFAULT_SAMPLING_CONFIG,
) -> SceneRender:
    """Sample a random scene from `seed` and render it at `image_size` ((H, W) or a side).

    The same seed, size and config always give the same bytes. The layout depends on the seed and the aspect
    ratio only, so one seed gives the same scene at every resolution of one aspect ratio (unless a small render
    makes a layout fail the visibility check). Every object keeps at least `min_visible_fraction_of_image` of the
    image and `min_visible_fraction_of_object` of its own silhouette visible.
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    size = normalise_image_size(image_size)
    validate_num_objects(num_objects, config)
    rng = np.random.default_rng(int(seed))
    # The count is always drawn, so fixing num_objects leaves the rest of the scene's random stream unchanged.
    sampled_count = int(rng.integers(config.min_objects, config.max_objects + 1))
    num_objects = sampled_count if num_objects is None else int(num_objects)
    aspect = size[1] / size[0]
    for attempt in range(config.max_layout_attempts):
        # A camera that sees too little ground for the objects is replaced after a few failed layouts.
        if attempt % config.layouts_per_camera == 0:
            camera = _sample_camera(rng, config)
            wall_distance = _sample_range(rng, config.wall_distance_range)
            ground_texture = _sample_texture(rng, config, grey_range=(0.4, 0.7))
            wall_texture = _sample_texture(rng, config, grey_range=(0.6, 0.85))
            lighting = _sample_lighting(rng, config)
        objects = _sample_layout(rng, camera, num_objects, wall_distance, aspect, config)
        if objects is None:
            continue
        spec = SceneSpec(
            objects=objects,
            wall_distance=wall_distance,
            ground_texture=ground_texture,
            wall_texture=wall_texture,
            lighting=lighting,
        )
        hits = _raycast(spec, camera, size)
        if _layout_is_visible(hits, len(objects), size[0] * size[1], config):
            return _compose_render(spec, camera, size, hits, seed=int(seed))
    raise RuntimeError(
        f"no layout of {num_objects} objects stayed visible at image size {size} after "
        f"{config.max_layout_attempts} attempts (seed {seed}); use a larger image or fewer objects"
    )


def render_scenes(
    seeds: Sequence[int], image_size: int | tuple[int, int] = 256, processes: int = 1
) -> Iterator[SceneRender]:
    """`render_scene(seed, image_size)` for each seed, in order; with `processes` > 1, rendered by that many worker
    processes. Each scene follows from its seed alone, so the scenes are the same either way."""
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise ValueError(f"processes must be a positive int, got {processes!r}")
    if processes == 1 or len(seeds) < 2:
        yield from (render_scene(seed, image_size) for seed in seeds)
        return
    # Forked workers only ray-cast with numpy; the parent's torch threads are not touched there.
    with multiprocessing.get_context("fork").Pool(min(processes, len(seeds))) as pool:
        yield from pool.imap(partial(render_scene, image_size=image_size), seeds, chunksize=16)
