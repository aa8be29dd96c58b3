"""Procedural, seeded, class-conditional image and video data for the reference models.

Every sample is one shape (circle, square, triangle, ring) in one colour (red, green, blue,
yellow) drawn anti-aliased over a dim, textured background (tinted base colour, a smooth
gradient, faint sinusoidal stripes and a little pixel noise), at a random position, size and
rotation.  A class is a (shape, colour) pair, so there are 16 classes; class ``k`` is
``SHAPES[k // 4]`` in ``COLOURS[k % 4]``.

All randomness comes from the ``torch.Generator`` passed in, so a seed fixes the data exactly.
Images are returned as float32 tensors in ``[-1, 1]`` (the range diffusers VAEs use), shape
``(N, 3, H, W)``; clips are ``(N, 3, T, H, W)``.

Shape sizes are in absolute pixels (radius 11-20 px) whatever the canvas size, so a 128x128
canvas shows the same kind of object as a 64x64 one, just with more background around it.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "SHAPES",
    "COLOURS",
    "COLOUR_RGB",
    "CLASS_NAMES",
    "NUM_CLASSES",
    "class_name",
    "class_colour",
    "make_images",
    "make_clips",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.15, 0.12),
    "green": (0.15, 0.85, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.15),
}
CLASS_NAMES: tuple[str, ...] = tuple(f"{c}_{s}" for s in SHAPES for c in COLOURS)
NUM_CLASSES = len(CLASS_NAMES)

R_MIN, R_MAX = 11.0, 20.0  # shape "radius" in pixels


def class_name(label: int) -> str:
    return CLASS_NAMES[int(label)]


def class_colour(label: int) -> tuple[float, float, float]:
    """Nominal RGB colour (0..1) of class ``label``'s shape."""
    return COLOUR_RGB[COLOURS[int(label) % len(COLOURS)]]


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=gen)


def _sdf(shape_idx: torch.Tensor, px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, negative inside) of each sample's shape. px/py: (N,H,W) local coords."""
    n = px.shape[0]
    out = torch.empty_like(px)
    r = r.view(n, 1, 1)
    # circle
    d_circle = torch.sqrt(px * px + py * py) - r
    # square (half side 0.85 r)
    qx = px.abs() - 0.85 * r
    qy = py.abs() - 0.85 * r
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    d_square = outside + torch.maximum(qx, qy).clamp(max=0)
    # equilateral triangle with circumradius ~1.35 r (Inigo Quilez's sdEquilateralTriangle)
    s = 1.35 * r * math.sqrt(3.0) / 2.0  # half side
    k = math.sqrt(3.0)
    tx = px.abs() - s
    ty = -py + s / k
    flip = (tx + k * ty) > 0
    tx2 = torch.where(flip, (tx - k * ty) / 2.0, tx)
    ty2 = torch.where(flip, (-k * tx - ty) / 2.0, ty)
    tx2 = tx2 - torch.clamp(tx2, -2.0 * s, torch.zeros_like(tx2))
    d_tri = -torch.sqrt(tx2 * tx2 + ty2 * ty2) * torch.sign(ty2)
    # ring (outer radius r, thickness 0.45 r)
    d_ring = (torch.sqrt(px * px + py * py) - 0.775 * r).abs() - 0.225 * r
    for i, d in enumerate((d_circle, d_square, d_tri, d_ring)):
        m = shape_idx == i
        if m.any():
            out[m] = d[m]
    return out


def _backgrounds(gen: torch.Generator, n: int, h: int, w: int) -> torch.Tensor:
    """Dim textured backgrounds in [0, 1], (N, 3, H, W)."""
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w)
    base = 0.12 + 0.22 * _rand(gen, n, 1, 1, 1)  # brightness
    tint = 1.0 + 0.25 * (_rand(gen, n, 3, 1, 1) - 0.5)  # mild colour cast
    bg = base * tint
    # smooth linear gradient
    ga = 2 * math.pi * _rand(gen, n, 1, 1)
    gs = 0.10 * _rand(gen, n, 1, 1)
    grad = gs * ((xs / w - 0.5) * torch.cos(ga) + (ys / h - 0.5) * torch.sin(ga))
    # faint stripes at a random angle / period
    sa = math.pi * _rand(gen, n, 1, 1)
    period = 6.0 + 10.0 * _rand(gen, n, 1, 1)
    amp = 0.035 * _rand(gen, n, 1, 1)
    phase = 2 * math.pi * _rand(gen, n, 1, 1)
    stripes = amp * torch.sin(2 * math.pi * (xs * torch.cos(sa) + ys * torch.sin(sa)) / period + phase)
    noise = 0.015 * torch.randn(n, 1, h, w, generator=gen)
    return (bg + (grad + stripes).unsqueeze(1) + noise).clamp(0, 1)


def _draw(
    canvas: torch.Tensor,
    labels: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
    r: torch.Tensor,
    ang: torch.Tensor,
    rgb: torch.Tensor,
) -> torch.Tensor:
    """Composite each sample's shape onto ``canvas`` (N,3,H,W in [0,1])."""
    n, _, h, w = canvas.shape
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w) + 0.5
    dx = xs - cx.view(n, 1, 1)
    dy = ys - cy.view(n, 1, 1)
    c, s = torch.cos(ang).view(n, 1, 1), torch.sin(ang).view(n, 1, 1)
    px = c * dx + s * dy
    py = -s * dx + c * dy
    d = _sdf(labels // len(COLOURS), px, py, r)
    alpha = (0.5 - d).clamp(0, 1).unsqueeze(1)  # 1-pixel anti-aliased edge
    # gentle shading across the shape so it is not perfectly flat
    shade = 1.0 + 0.12 * (px / (r.view(n, 1, 1) * 2)).unsqueeze(1)
    fg = (rgb.view(n, 3, 1, 1) * shade).clamp(0, 1)
    return canvas * (1 - alpha) + fg * alpha


def _class_rgb(gen: torch.Generator, labels: torch.Tensor) -> torch.Tensor:
    table = torch.tensor([COLOUR_RGB[c] for c in COLOURS], dtype=torch.float32)
    rgb = table[labels % len(COLOURS)]
    bright = 0.8 + 0.2 * _rand(gen, labels.shape[0], 1)
    jitter = 0.06 * (_rand(gen, labels.shape[0], 3) - 0.5)
    return (rgb * bright + jitter).clamp(0, 1)


def make_images(
    n: int,
    size: int = 64,
    generator: torch.Generator | None = None,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of ``size`` x ``size`` pixels and their class labels.

    Returns ``(images, labels)``: float32 ``(n, 3, size, size)`` in ``[-1, 1]`` and int64 ``(n,)``.
    """
    if size < 2 * R_MAX + 4:
        raise ValueError(f"size must be at least {int(2 * R_MAX + 4)} pixels, got {size}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if labels is None:
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    labels = labels.long()
    bg = _backgrounds(gen, n, size, size)
    r = R_MIN + (R_MAX - R_MIN) * _rand(gen, n)
    margin = r * 0.9
    cx = margin + (size - 2 * margin) * _rand(gen, n)
    cy = margin + (size - 2 * margin) * _rand(gen, n)
    ang = 2 * math.pi * _rand(gen, n)
    rgb = _class_rgb(gen, labels)
    img = _draw(bg, labels, cx, cy, r, ang, rgb)
    return img * 2 - 1, labels


def make_clips(
    n: int,
    frames: int = 5,
    size: int = 32,
    generator: torch.Generator | None = None,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` short clips of one shape moving (and turning) in a straight line over a static background.

    Returns ``(clips, labels)``: float32 ``(n, 3, frames, size, size)`` in ``[-1, 1]`` and int64 ``(n,)``.
    Shape radius scales with the canvas (``size * 0.16 .. 0.28``) so small canvases still fit it.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if labels is None:
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    labels = labels.long()
    bg = _backgrounds(gen, n, size, size)
    r = size * (0.16 + 0.12 * _rand(gen, n))
    margin = r * 0.9
    x0 = margin + (size - 2 * margin) * _rand(gen, n)
    y0 = margin + (size - 2 * margin) * _rand(gen, n)
    x1 = margin + (size - 2 * margin) * _rand(gen, n)
    y1 = margin + (size - 2 * margin) * _rand(gen, n)
    ang0 = 2 * math.pi * _rand(gen, n)
    spin = (_rand(gen, n) - 0.5) * 1.2  # radians over the whole clip
    rgb = _class_rgb(gen, labels)
    out = []
    for f in range(frames):
        t = f / max(frames - 1, 1)
        out.append(_draw(bg, labels, x0 + (x1 - x0) * t, y0 + (y1 - y0) * t, r, ang0 + spin * t, rgb))
    clips = torch.stack(out, dim=2)
    return clips * 2 - 1, labels
