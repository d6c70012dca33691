"""Pixels: a scene record drawn as an image (a light background, then each object), and PNG bytes of it."""

from __future__ import annotations

import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw

from .config import COLORS, SceneConfig

SUPERSAMPLE = 4  # objects are drawn this many times larger and averaged back down: anti-aliased edges


def render(scene: dict, cfg: SceneConfig | None = None) -> np.ndarray:
    """The image of a scene record, uint8 (H, W, 3); the same record and seed always give the same pixels."""
    cfg = cfg or SceneConfig()
    rng = np.random.default_rng([cfg.seed, scene["image_id"], 1])
    big = cfg.image_size * SUPERSAMPLE
    canvas = Image.fromarray(_background(rng, cfg.image_size)).resize((big, big), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for obj in scene["objects"]:
        color = np.clip(np.array(COLORS[obj["color"]]) + rng.integers(-10, 11, 3), 0, 255)  # slight hue jitter
        # PIL's integer coordinates are pixel centres, hence the half-pixel shift
        points = [(x * SUPERSAMPLE - 0.5, y * SUPERSAMPLE - 0.5) for x, y in outline(obj)]
        draw.polygon(points, fill=tuple(int(c) for c in color))
    return np.array(canvas.reduce(SUPERSAMPLE))  # each pixel averages its block of supersamples


def to_image(scene: dict, cfg: SceneConfig | None = None, scale: int = 1) -> Image.Image:
    """A scene as a PIL image, enlarged `scale` times with crisp pixels (for notebooks)."""
    image = Image.fromarray(render(scene, cfg))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A light, nearly grey tint with a soft gradient and mild noise, uint8 (size, size, 3)."""
    tint = rng.uniform(200, 240) + rng.uniform(-12, 12, 3).astype(np.float32)  # (3,)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32) * rng.uniform(0, 30)  # (W,)
    gradient = np.cos(angle) * ramp[None, :, None] + np.sin(angle) * ramp[:, None, None]  # (H, W, 1)
    spread = int(rng.integers(0, 6))
    noise = rng.integers(-spread, spread + 1, (size, size, 3), dtype=np.int16)  # (H, W, 3), uniform: fast to draw
    return np.clip(tint + gradient + noise, 165, 255).astype(np.uint8)


def outline(obj: dict) -> list[tuple[float, float]]:
    """The polygon of an object in image pixels, fitted to its bbox."""
    x0, y0, x1, y1 = obj["bbox"]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if obj["shape"] == "circle":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return list(zip(cx + (x1 - x0) / 2 * np.cos(t), cy + (y1 - y0) / 2 * np.sin(t), strict=True))
    if obj["shape"] == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if obj["shape"] == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]  # diamond


def png_bytes(image: np.ndarray) -> bytes:
    """A PNG file of a uint8 (H, W, 3) image, written directly: faster than PIL's encoder on tiny images."""
    h, w, _ = image.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * 3)], axis=1)  # filter byte 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits per channel, RGB, no interlacing
    idat = zlib.compress(rows.tobytes(), 1)  # fastest level: the noise in the background barely compresses
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
