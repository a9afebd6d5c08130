"""The embedded default data: a deterministic, casting-style inspection data set.

Modelled on Kaggle's "casting product image data for quality inspection": grayscale, top-down
pictures of a round cast impeller under slightly varying light, with the same folder layout::

    OUT/
      train/def_front/cast_def_0_17.png
      train/ok_front/cast_ok_0_3.png
      test/def_front/...
      test/ok_front/...
      defect_types.csv      path,split,label,defect_type,subtle,x0,y0,x1,y1 (the defect's box)

Each image is rendered from a height map (disc, rim, hub, bore, blades, sand-cast texture) lit
by a random light, so defects that change the surface (pits, trenches, burrs, a bite out of the
rim) shade the way real ones do. A quarter of the defects are drawn small and shallow: a model
has to look, not just threshold the brightness. Image ``i`` depends only on ``(seed, split, i)``,
so the set is identical for a seed whatever the order or machine.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from qi.config import SynthConfig, cache_dir

log = logging.getLogger(__name__)

DEFECT_TYPES = ("blow_hole", "crack", "scratch_burr", "chipped_edge", "pin_holes")
OK_FOLDER = "ok_front"
DEFECT_FOLDER = "def_front"
MANIFEST = "defect_types.csv"
# the defect's box in the manifest, pixels of the written image (empty for good parts)
REGION_COLUMNS = ("x0", "y0", "x1", "y1")
_FORMAT = 2  # of the written set: 2 added the defect boxes
_COMPLETE_MARKER = ".complete.json"


class Canvas:
    """Height map and albedo of one part being drawn; defects edit both."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.rng = rng
        s = size
        self.cx = s / 2 + rng.uniform(-0.03, 0.03) * s
        self.cy = s / 2 + rng.uniform(-0.03, 0.03) * s
        self.radius = s * rng.uniform(0.40, 0.44)
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        self.xx, self.yy = xx, yy
        self.r = np.hypot(xx - self.cx, yy - self.cy)
        self.theta = np.arctan2(yy - self.cy, xx - self.cx)
        self.height = np.zeros((s, s), np.float32)
        self.albedo = np.full((s, s), 0.25, np.float32)
        self.part = np.zeros((s, s), np.float32)

    def draw_part(self) -> None:
        rng, r, radius = self.rng, self.r, self.radius
        edge = max(self.size / 128, 0.8)
        self.part = np.clip((radius - r) / edge, 0, 1)
        h = 1.0 * self.part
        # raised rim near the outer edge
        h += 0.35 * np.exp(-(((r - 0.92 * radius) / (0.035 * radius)) ** 2))
        # hub and bore
        hub = np.clip((0.30 * radius - r) / edge, 0, 1)
        h += 0.45 * hub
        bore_r = radius * rng.uniform(0.10, 0.13)
        bore = np.clip((bore_r - r) / edge, 0, 1)
        h -= 2.0 * bore
        # curved blades between hub and rim
        n_blades = int(rng.integers(5, 9))
        phase = rng.uniform(0, 2 * np.pi)
        curve = rng.uniform(0.6, 1.4)
        rel = r / radius
        band = np.clip((rel - 0.33) / 0.05, 0, 1) * np.clip((0.85 - rel) / 0.05, 0, 1)
        for k in range(n_blades):
            centre = phase + 2 * np.pi * k / n_blades + curve * rel
            d_angle = np.angle(np.exp(1j * (self.theta - centre)))
            dist = np.abs(d_angle) * r
            h += 0.22 * band * np.exp(-((dist / (0.035 * radius)) ** 2))
        # sand-cast surface texture, two scales
        fine = cv2.GaussianBlur(rng.normal(0, 1, r.shape).astype(np.float32), (0, 0), 0.8)
        coarse = cv2.GaussianBlur(rng.normal(0, 1, r.shape).astype(np.float32), (0, 0), 3.0)
        h += self.part * (0.035 * fine + 0.09 * coarse)
        self.height = h.astype(np.float32)
        metal = rng.uniform(0.55, 0.70)
        self.albedo = (0.25 + (metal - 0.25) * self.part - 0.2 * bore).astype(np.float32)

    def random_point_on_part(self, r_min: float, r_max: float) -> tuple[float, float]:
        angle = self.rng.uniform(0, 2 * np.pi)
        rad = self.radius * self.rng.uniform(r_min, r_max)
        return self.cx + rad * np.cos(angle), self.cy + rad * np.sin(angle)

    def render(self) -> np.ndarray:
        """Lambertian shading of the height map plus lighting drift and sensor noise."""
        rng, s = self.rng, self.size
        relief = 6.0 * s / 128
        gy, gx = np.gradient(self.height * relief)
        normal_z = 1.0 / np.sqrt(gx**2 + gy**2 + 1.0)
        azimuth = rng.uniform(0, 2 * np.pi)
        elevation = rng.uniform(np.radians(35), np.radians(60))
        lx = np.cos(elevation) * np.cos(azimuth)
        ly = np.cos(elevation) * np.sin(azimuth)
        lz = np.sin(elevation)
        shade = np.clip((-gx * lx - gy * ly + lz) * normal_z, 0, 1)
        light = 0.35 + 0.65 * shade
        ramp_angle = rng.uniform(0, 2 * np.pi)
        ramp = np.cos(ramp_angle) * (self.xx / s - 0.5) + np.sin(ramp_angle) * (self.yy / s - 0.5)
        drift = 1.0 + rng.uniform(0.0, 0.25) * ramp
        gain = rng.uniform(0.85, 1.15)
        img = self.albedo * light * drift * gain
        img += rng.normal(0, 0.012, img.shape)
        return np.clip(img * 255, 0, 255).astype(np.uint8)


def _blow_hole(c: Canvas, scale: float) -> None:
    for _ in range(int(c.rng.integers(1, 3))):
        x, y = c.random_point_on_part(0.35, 0.85)
        rad = c.size * c.rng.uniform(0.025, 0.05) * scale
        # irregular outline: a blurred, thresholded blob around the centre
        d = np.hypot((c.xx - x) / c.rng.uniform(0.7, 1.3), (c.yy - y) / c.rng.uniform(0.7, 1.3))
        pit = np.clip((rad - d) / max(rad * 0.35, 0.8), 0, 1)
        c.height -= 0.9 * scale * pit
        c.albedo *= 1 - 0.45 * scale * pit


def _polyline_mask(c: Canvas, points: np.ndarray, width: int) -> np.ndarray:
    mask = np.zeros((c.size, c.size), np.uint8)
    pts = np.round(points * 16).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(mask, [pts], False, 255, thickness=width, lineType=cv2.LINE_AA, shift=4)
    return mask.astype(np.float32) / 255.0


def _crack(c: Canvas, scale: float) -> None:
    x, y = c.random_point_on_part(0.4, 0.9)
    heading = c.rng.uniform(0, 2 * np.pi)
    length = c.size * c.rng.uniform(0.18, 0.35) * (0.6 + 0.4 * scale)
    steps = 14
    points = [(x, y)]
    for _ in range(steps):
        heading += c.rng.normal(0, 0.45)
        x += np.cos(heading) * length / steps
        y += np.sin(heading) * length / steps
        points.append((x, y))
    mask = _polyline_mask(c, np.array(points), width=1 if scale < 1 else 2) * c.part
    c.height -= 0.8 * scale * mask
    c.albedo *= 1 - 0.5 * scale * mask


def _scratch_burr(c: Canvas, scale: float) -> None:
    for _ in range(int(c.rng.integers(1, 4))):
        x, y = c.random_point_on_part(0.3, 0.9)
        angle = c.rng.uniform(0, np.pi)
        half = c.size * c.rng.uniform(0.08, 0.18) * (0.6 + 0.4 * scale)
        ends = np.array(
            [
                (x - half * np.cos(angle), y - half * np.sin(angle)),
                (x + half * np.cos(angle), y + half * np.sin(angle)),
            ]
        )
        mask = _polyline_mask(c, ends, width=1) * c.part
        c.height += 0.35 * scale * mask  # raised burr edge
        c.albedo += 0.35 * scale * mask  # bright, freshly exposed metal


def _chipped_edge(c: Canvas, scale: float) -> None:
    angle = c.rng.uniform(0, 2 * np.pi)
    bite = c.size * c.rng.uniform(0.05, 0.09) * (0.55 + 0.45 * scale)
    bx = c.cx + c.radius * np.cos(angle)
    by = c.cy + c.radius * np.sin(angle)
    d = np.hypot(c.xx - bx, c.yy - by)
    chip = np.clip((bite - d) / 1.0, 0, 1) * c.part
    c.height -= chip * (c.height + 0.0)
    c.albedo = c.albedo * (1 - chip) + 0.25 * chip
    c.part = c.part * (1 - chip)


def _pin_holes(c: Canvas, scale: float) -> None:
    x0, y0 = c.random_point_on_part(0.35, 0.85)
    spread = c.size * 0.06
    for _ in range(int(c.rng.integers(5, 12))):
        x = x0 + c.rng.normal(0, spread)
        y = y0 + c.rng.normal(0, spread)
        rad = c.size / 128 * c.rng.uniform(0.9, 1.6) * (0.7 + 0.3 * scale)
        d = np.hypot(c.xx - x, c.yy - y)
        hole = np.clip((rad - d) / 0.7, 0, 1) * c.part
        c.height -= 0.7 * scale * hole
        c.albedo *= 1 - 0.55 * scale * hole


_DEFECT_PAINTERS: dict[str, Callable[[Canvas, float], None]] = {
    "blow_hole": _blow_hole,
    "crack": _crack,
    "scratch_burr": _scratch_burr,
    "chipped_edge": _chipped_edge,
    "pin_holes": _pin_holes,
}


def render_casting(
    size: int, seed: int, defect_type: str | None, subtle: bool = False
) -> np.ndarray:
    """One grayscale casting image (uint8, ``size`` x ``size``), deterministic for ``seed``."""
    return render_casting_with_region(size, seed, defect_type, subtle)[0]


def render_casting_with_region(
    size: int, seed: int, defect_type: str | None, subtle: bool = False
) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """The image and, for a defect, the box ``(x0, y0, x1, y1)`` (pixels, inclusive) of every
    pixel the defect changed: where an explanation of the decision should point."""
    part_rng = np.random.default_rng(seed)
    canvas = Canvas(size, part_rng)
    canvas.draw_part()
    region = None
    if defect_type is not None:
        before = canvas.height.copy(), canvas.albedo.copy(), canvas.part.copy()
        # a stream of its own: the defective image is its good twin plus the defect
        canvas.rng = np.random.default_rng([seed, 1])
        scale = canvas.rng.uniform(0.55, 0.7) if subtle else canvas.rng.uniform(0.9, 1.2)
        _DEFECT_PAINTERS[defect_type](canvas, scale)
        canvas.rng = part_rng
        changed = np.zeros((size, size), bool)
        for old, new in zip(before, (canvas.height, canvas.albedo, canvas.part), strict=True):
            changed |= np.abs(new - old) > 1e-3
        if changed.any():
            ys, xs = np.nonzero(changed)
            region = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    return canvas.render(), region


def _image_seed(seed: int, split: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def plan_images(config: SynthConfig) -> list[dict]:
    """What each image will show: split, file name, defect type, subtlety, seed."""
    rows: list[dict] = []
    for split, count in (("train", config.n_train), ("test", config.n_test)):
        rng = np.random.default_rng(_image_seed(config.seed, split, -1))
        n_def = int(round(count * config.defect_fraction))
        defective = np.zeros(count, bool)
        defective[:n_def] = True
        rng.shuffle(defective)
        for i in range(count):
            if defective[i]:
                defect = DEFECT_TYPES[i % len(DEFECT_TYPES)]
                subtle = bool(rng.random() < config.subtle_fraction)
                folder, name = DEFECT_FOLDER, f"cast_def_0_{i}.png"
            else:
                defect, subtle = None, False
                folder, name = OK_FOLDER, f"cast_ok_0_{i}.png"
            rows.append(
                {
                    "path": f"{split}/{folder}/{name}",
                    "split": split,
                    "label": "defective" if defect else "ok",
                    "defect_type": defect or "none",
                    "subtle": subtle,
                    "seed": _image_seed(config.seed, split, i),
                }
            )
    return rows


def generate(out_dir: Path, config: SynthConfig = SynthConfig(), progress: bool = True) -> Path:
    """Write the data set to ``out_dir`` (created); returns ``out_dir``."""
    out_dir = Path(out_dir)
    rows = plan_images(config)
    for folder in {Path(row["path"]).parent for row in rows}:
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    for row in tqdm(rows, desc="synthesising castings", disable=not progress, unit="img"):
        image, region = render_casting_with_region(
            config.image_size,
            row["seed"],
            None if row["defect_type"] == "none" else row["defect_type"],
            row["subtle"],
        )
        row.update(zip(REGION_COLUMNS, region or ("",) * 4, strict=True))
        if not cv2.imwrite(str(out_dir / row["path"]), image):
            raise OSError(f"could not write {out_dir / row['path']}: check space and permissions")
    with open(out_dir / MANIFEST, "w", newline="") as fh:
        fields = ["path", "split", "label", "defect_type", "subtle", *REGION_COLUMNS]
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in writer.fieldnames})
    (out_dir / _COMPLETE_MARKER).write_text(json.dumps(asdict(config)))
    return out_dir


def default_dataset(config: SynthConfig = SynthConfig(), progress: bool = True) -> Path:
    """The embedded data set for ``config``, generated once into the qi cache and reused."""
    described = json.dumps({**asdict(config), "format": _FORMAT}, sort_keys=True)
    key = hashlib.sha256(described.encode()).hexdigest()[:12]
    target = cache_dir() / "synthetic" / f"casting-{key}"
    if (target / _COMPLETE_MARKER).exists():
        return target
    log.info("generating the embedded casting data set into %s", target)
    # a private folder per process: parallel workers may generate at once, one rename wins
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    generate(partial, config, progress=progress)
    try:
        partial.rename(target)
    except OSError:
        if not (target / _COMPLETE_MARKER).exists():
            raise
        shutil.rmtree(partial, ignore_errors=True)
    return target
