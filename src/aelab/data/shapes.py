"""The built-in "shapes" dataset: ten procedurally drawn shape classes, generated in seconds.

Every image is a smooth random background, a few clutter dots and strokes, one foreground shape
(random colour with a minimum contrast to the background, random position, size and rotation) and
Gaussian pixel noise. The class is the shape only, so colour, position and orientation are
nuisances: a linear model on raw pixels does poorly while a small conv net learns it, which is what
makes the dataset useful for comparing pretraining methods offline.

Shapes are drawn as signed distance fields evaluated on the pixel grid of all images at once
(vectorised numpy), antialiased by clipping the distance in pixels to [-0.5, 0.5].
"""

from __future__ import annotations

import numpy as np
import torch

SHAPES_CLASSES: list[str] = [
    "disc", "square", "triangle", "plus", "ring",
    "diamond", "semicircle", "frame", "stripes", "checker",
]

# Generator knobs, in units of the image side S unless stated otherwise.
_RADIUS = (0.17, 0.30)       # shape radius (its local unit), as a fraction of S
_MIN_CONTRAST = 0.45         # min RGB distance (colours in [0, 1]) between shape and background
_GRADIENT = 0.35             # max per-channel background change across the image
_CLUTTER = (2, 6)            # number of dots/strokes per image, [low, high)
_NOISE_STD = 0.04            # Gaussian pixel noise, colours in [0, 1]
_CHUNK = 1024                # images rendered at once (bounds memory: ~[chunk, K, S, S] floats)


def _shape_distance(kind: int, u: np.ndarray, v: np.ndarray, radius_px: np.ndarray) -> np.ndarray:
    """Signed distance in pixels (< 0 inside) of shape `kind` at local coordinates u, v: [B, S, S].

    Local units are the shape radius, so most shapes fit the unit disc; textured patches return
    the distance to their cells so the texture is antialiased like an edge.
    """
    au, av = np.abs(u), np.abs(v)
    r = np.sqrt(u * u + v * v)
    cheb = np.maximum(au, av)
    if kind == 0:    # disc
        d = r - 1.0
    elif kind == 1:  # square
        d = cheb - 0.8
    elif kind == 2:  # equilateral triangle, circumradius 1: the max over its three edge lines
        d = np.maximum(np.maximum(-v, 0.866 * u + 0.5 * v), -0.866 * u + 0.5 * v) - 0.5
    elif kind == 3:  # plus: the union of two bars
        d = np.minimum(np.maximum(au - 1.0, av - 0.3), np.maximum(au - 0.3, av - 1.0))
    elif kind == 4:  # ring
        d = np.abs(r - 0.72) - 0.24
    elif kind == 5:  # elongated rhombus (half diagonals 1 and 0.55): not a rotated square
        d = (0.55 * au + av - 0.55) / np.hypot(0.55, 1.0)
    elif kind == 6:  # half disc, shifted so its centroid sits near the centre
        vs = v + 0.42
        d = np.maximum(np.sqrt(u * u + vs * vs) - 1.0, -vs)
    elif kind == 7:  # hollow square frame
        d = np.maximum(cheb - 0.9, 0.55 - cheb)
    elif kind == 8:  # square patch of parallel stripes (period 0.8)
        stripes = -np.sin(u * (2 * np.pi / 0.8)) * (0.8 / (2 * np.pi))
        d = np.maximum(cheb - 0.85, stripes)
    elif kind == 9:  # square patch of a checkerboard (cells 0.57)
        w = np.pi / 0.57
        checker = -np.sin(u * w) * np.sin(v * w) / w
        d = np.maximum(cheb - 0.85, checker)
    else:
        raise ValueError(f"unknown shape kind {kind}")
    return d * radius_px[:, None, None]


def _alpha(distance_px: np.ndarray) -> np.ndarray:
    """Antialiased coverage in [0, 1] from a signed distance in pixels."""
    return np.clip(0.5 - distance_px, 0.0, 1.0)


def _contrasting_colours(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """Foreground colours [n, 3] at least _MIN_CONTRAST away from `background` [n, 3]."""
    colours = rng.random(background.shape)
    for _ in range(20):
        bad = np.linalg.norm(colours - background, axis=1) < _MIN_CONTRAST
        if not bad.any():
            return colours
        colours[bad] = rng.random((int(bad.sum()), 3))
    # Still too close after 20 draws (background near mid-grey): take the opposite corner.
    bad = np.linalg.norm(colours - background, axis=1) < _MIN_CONTRAST
    colours[bad] = (background[bad] < 0.5).astype(colours.dtype)
    return colours


def _draw_params(n: int, rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """Every per-image random choice, drawn up front so chunked rendering stays deterministic."""
    labels = rng.permutation(np.arange(n) % len(SHAPES_CLASSES))  # balanced classes
    radius = rng.uniform(*_RADIUS, n) * size
    margin = radius + 1.0
    k_max = _CLUTTER[1]
    p = {
        "labels": labels,
        "radius": radius,
        "cx": margin + rng.random(n) * (size - 2 * margin),
        "cy": margin + rng.random(n) * (size - 2 * margin),
        "theta": rng.uniform(0, 2 * np.pi, n),
        "bg": rng.random((n, 3)),
        "bg_dir": rng.uniform(0, 2 * np.pi, n),
        "bg_amp": rng.uniform(-_GRADIENT, _GRADIENT, (n, 3)),
        # Clutter: up to k_max items, the first `count` used; each a stroke from p0 to p1
        # (a dot when p0 == p1) of half-width `width`, in a random colour.
        "count": rng.integers(*_CLUTTER, n),
        "p0": rng.random((n, k_max, 2)) * size,
        "dir": rng.uniform(0, 2 * np.pi, (n, k_max)),
        "length": np.where(rng.random((n, k_max)) < 0.5, 0.0, rng.uniform(3, 7, (n, k_max))),
        "width": rng.uniform(0.6, 1.4, (n, k_max)),
        "clutter_rgb": rng.random((n, k_max, 3)),
    }
    p["fg"] = _contrasting_colours(rng, p["bg"])
    return p


def _render(p: dict[str, np.ndarray], sl: slice, size: int, noise: np.ndarray) -> np.ndarray:
    """Render images `sl` of the parameter set into floats [B, S, S, 3] in [0, 1]."""
    f32 = np.float32
    ys, xs = np.meshgrid(np.arange(size, dtype=f32) + 0.5, np.arange(size, dtype=f32) + 0.5,
                         indexing="ij")                                   # [S, S]
    # float32 throughout: half the memory traffic of float64, and plenty for 8-bit output.
    q = {k: (v[sl].astype(f32) if v.dtype.kind == "f" else v[sl]) for k, v in p.items()}
    b = len(q["labels"])

    # Background: base colour plus a linear gradient along a random direction.
    ramp = ((xs - size / 2) * np.cos(q["bg_dir"])[:, None, None]
            + (ys - size / 2) * np.sin(q["bg_dir"])[:, None, None]) / size   # [B, S, S]
    img = q["bg"][:, None, None, :] + ramp[..., None] * q["bg_amp"][:, None, None, :]

    # Clutter: distance from every pixel to every segment, [B, K, S, S].
    p0 = q["p0"]
    d = np.stack([np.cos(q["dir"]), np.sin(q["dir"])], -1) * q["length"][..., None]  # [B, K, 2]
    px = xs[None, None] - p0[..., 0, None, None]
    py = ys[None, None] - p0[..., 1, None, None]
    seg2 = np.maximum((d * d).sum(-1), 1e-6)[..., None, None]
    t = np.clip((px * d[..., 0, None, None] + py * d[..., 1, None, None]) / seg2, 0.0, 1.0)
    dist = np.hypot(px - t * d[..., 0, None, None], py - t * d[..., 1, None, None])
    cover = _alpha(dist - q["width"][..., None, None])                     # [B, K, S, S]
    cover *= (np.arange(p0.shape[1])[None] < q["count"][:, None])[..., None, None]
    for k in range(p0.shape[1]):  # painter's order
        a = cover[:, k, :, :, None]
        img = img * (1 - a) + q["clutter_rgb"][:, k, None, None, :] * a

    # The shape, in its own rotated frame (unit = radius).
    dx = (xs[None] - q["cx"][:, None, None]) / q["radius"][:, None, None]
    dy = (ys[None] - q["cy"][:, None, None]) / q["radius"][:, None, None]
    c, s = np.cos(q["theta"])[:, None, None], np.sin(q["theta"])[:, None, None]
    u, v = c * dx + s * dy, -s * dx + c * dy                               # [B, S, S]
    alpha = np.empty((b, size, size), dtype=f32)
    for kind in range(len(SHAPES_CLASSES)):
        idx = np.flatnonzero(q["labels"] == kind)
        if idx.size:
            alpha[idx] = _alpha(_shape_distance(kind, u[idx], v[idx], q["radius"][idx]))
    img = img * (1 - alpha[..., None]) + q["fg"][:, None, None, :] * alpha[..., None]
    return img + noise


def make_shapes(n: int, seed: int, image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """n images uint8 [n,3,S,S] and labels int64 [n], deterministic in (n, seed), balanced."""
    if n < 0 or image_size < 8:
        raise ValueError(f"make_shapes needs n >= 0 and image_size >= 8, got {n}, {image_size}")
    rng = np.random.default_rng(seed)
    p = _draw_params(n, rng, image_size)
    out = np.empty((n, 3, image_size, image_size), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n))
        shape = (sl.stop - sl.start, image_size, image_size, 3)
        noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(_NOISE_STD)
        img = _render(p, sl, image_size, noise)                            # [B, S, S, 3]
        img = np.clip(img * np.float32(255) + np.float32(0.5), 0, 255).astype(np.uint8)
        out[sl] = img.transpose(0, 3, 1, 2)
    return torch.from_numpy(out), torch.from_numpy(p["labels"].astype(np.int64))
