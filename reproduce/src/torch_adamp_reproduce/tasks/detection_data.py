"""The detection data set: Fashion-MNIST items pasted on cluttered, textured canvases, made at run time.

Nothing new ships: every canvas is drawn, deterministically from a fixed seed,
from the 14x14 Fashion-MNIST images the package already has (the first
``n / 10`` images per class of each split, exactly as the other tasks select
them, whatever the source). Training canvases use training images only, test
canvases test images only, and no item image is used twice within a split.

One canvas (``size x size`` grey pixels in [0, 1]) is made of, back to front:

1. a **textured background**: a random level plus smooth noise (a 4x4, 8x8 or
   16x16 grid of uniform noise resampled to the canvas) of random amplitude;
2. **clutter**: 0 to 4 unlabelled *fragments* of other items of the same split
   (a random crop of a third to a half of an item, resized and pasted at a
   lower contrast): bits of texture that look like parts of objects;
3. 1 to 5 **objects**, each an item resized to a random size (long side
   ``min_size``..``max_size`` pixels, log-uniform, the aspect ratio jittered by
   up to ``exp(0.25)``) and contrast, alpha-blended (opaque where the item is
   bright, transparent in its holes) at a random position, in drawing order:
   later objects occlude earlier ones. A position is rejected (and redrawn,
   up to 30 times, else the object is left out) when an earlier object would
   keep less than ``min_visible`` of its pixels visible;
4. **pixel noise** (Gaussian, sigma 0.02..0.08) over everything.

Each object's box is the COCO convention: the tight box of its *visible*
pixels (its item's pixels above 1/6 of full intensity that no later object
covers), ``(x0, y0, x1, y1)`` in pixel edges; its label is the item's
Fashion-MNIST class. What makes it non-trivial: objects as small as 8 pixels
(a 14x14 item shrunk to 8x8 loses much of what tells a shirt from a
pullover), low contrast against a textured background, item-like clutter,
and occlusion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import fashion_mnist

#: the share of full intensity above which an item pixel is opaque (alpha >= 0.5) and belongs to the object
ALPHA_GAIN = 3.0


@dataclass(frozen=True)
class DataConfig:
    size: int = 64
    train_images: int = 6000
    test_images: int = 500
    max_objects: int = 5
    min_size: float = 8.0
    max_size: float = 32.0
    max_fragments: int = 4
    min_visible: float = 0.5
    seed: int = 0
    #: items per split to draw from: the first n / 10 per class (the shipped subset has 20,000 and 5,000)
    train_items: int = 20000
    test_items: int = 5000


@dataclass
class Canvases:
    """``images`` float32 ``(n, size, size)`` in [0, 1]; per image: ``boxes`` float32 ``(k, 4)`` as
    ``(x0, y0, x1, y1)``, ``labels`` int64 ``(k,)``, ``items`` (indices of the objects' item images in
    ``item_images``), ``visible`` (each object's visible share of its pixels). ``fragment_items``: the
    items whose fragments were pasted as clutter. ``item_images``: the split's uint8 14x14 items."""

    images: np.ndarray
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    items: list[np.ndarray]
    visible: list[np.ndarray]
    fragment_items: list[np.ndarray]
    item_images: np.ndarray
    split: str
    source: str

    def stats(self) -> dict[str, float]:
        """Objects per image, share of small objects (long side of the box < 16 px), share occluded (visible
        share < 1) and the mean visible share of the occluded ones."""
        vis = np.concatenate(self.visible)
        sides = np.concatenate([np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) for b in self.boxes])
        occluded = vis < 1.0
        return {
            "objects_per_image": float(len(vis) / len(self.boxes)),
            "small_share": float((sides < 16).mean()),
            "occluded_share": float(occluded.mean()),
            "visible_share_of_occluded": float(vis[occluded].mean()) if occluded.any() else 1.0,
        }


def resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` linear resampling weights (triangle filter, widened when shrinking: antialiased),
    pixel centres aligned as ``align_corners=False``; every row sums to 1."""
    scale = n_in / n_out
    support = max(1.0, scale)
    centres = (np.arange(n_out) + 0.5) * scale - 0.5
    d = np.arange(n_in)[None, :] - centres[:, None]
    w = np.clip(1.0 - np.abs(d) / support, 0.0, None)
    out: np.ndarray = (w / w.sum(1, keepdims=True)).astype(np.float32)
    return out


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 ``(h, w)`` -> ``(height, width)`` by separable linear resampling."""
    out: np.ndarray = resample_matrix(image.shape[0], height) @ image @ resample_matrix(image.shape[1], width).T
    return out


def background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random level plus smooth noise of random scale and amplitude."""
    level = rng.uniform(0.0, 0.35)
    grid = int(rng.choice([4, 8, 16]))
    amp = rng.uniform(0.05, 0.3)
    noise = resize(rng.uniform(-1.0, 1.0, size=(grid, grid)).astype(np.float32), size, size)
    out: np.ndarray = (level + amp * noise).astype(np.float32)
    return out


def _paste(canvas: np.ndarray, patch: np.ndarray, gain: float, y: int, x: int) -> np.ndarray:
    """Alpha-blend ``gain * patch`` (intensities in [0, 1]) at ``(y, x)``; return the opaque mask."""
    h, w = patch.shape
    alpha = np.clip(ALPHA_GAIN * patch, 0.0, 1.0)
    region = canvas[y : y + h, x : x + w]
    region *= 1.0 - alpha
    region += alpha * gain * patch
    mask: np.ndarray = alpha >= 0.5
    return mask


def _object_shape(rng: np.random.Generator, cfg: DataConfig) -> tuple[int, int]:
    long = math.exp(rng.uniform(math.log(cfg.min_size), math.log(cfg.max_size)))
    ratio = math.exp(rng.uniform(-0.25, 0.25))
    h, w = (long, long / ratio) if ratio > 1 else (long * ratio, long)
    return max(4, round(h)), max(4, round(w))


def make_canvases(
    items: np.ndarray, labels: np.ndarray, n: int, cfg: DataConfig, rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """``n`` canvases from the uint8 ``items`` (see the module docstring)."""
    size = cfg.size
    order = rng.permutation(len(items))
    next_item = 0
    images = np.empty((n, size, size), dtype=np.float32)
    all_boxes, all_labels, all_items, all_visible, all_fragments = [], [], [], [], []
    for i in range(n):
        canvas = background(size, rng)
        frags = rng.integers(0, len(items), size=int(rng.integers(0, cfg.max_fragments + 1)))
        for f in frags:
            item = items[f].astype(np.float32) / 255.0
            ch, cw = (int(rng.integers(5, 8)) for _ in range(2))
            y0, x0 = int(rng.integers(0, 14 - ch + 1)), int(rng.integers(0, 14 - cw + 1))
            scale = math.exp(rng.uniform(math.log(cfg.min_size / 14), math.log(cfg.max_size / 14)))
            patch = resize(item[y0 : y0 + ch, x0 : x0 + cw], max(2, round(ch * scale)), max(2, round(cw * scale)))
            _paste(
                canvas,
                patch,
                rng.uniform(0.3, 0.7),
                int(rng.integers(0, size - patch.shape[0] + 1)),
                int(rng.integers(0, size - patch.shape[1] + 1)),
            )
        owner = np.full((size, size), -1, dtype=np.int64)
        counts: list[int] = []
        placed: list[int] = []
        for _ in range(int(rng.integers(1, cfg.max_objects + 1))):
            if next_item >= len(order):
                raise ValueError(f"not enough items ({len(items)}) for {n} canvases")
            idx = int(order[next_item])
            next_item += 1
            h, w = _object_shape(rng, cfg)
            patch = resize(items[idx].astype(np.float32) / 255.0, h, w)
            mask = np.clip(ALPHA_GAIN * patch, 0.0, 1.0) >= 0.5
            gain = rng.uniform(0.45, 1.0)
            shown = np.bincount(owner[owner >= 0], minlength=len(placed))
            for _attempt in range(30):
                y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
                covered = owner[y : y + h, x : x + w][mask]
                lost = np.bincount(covered[covered >= 0], minlength=len(placed))
                if all(shown[j] - lost[j] >= cfg.min_visible * counts[j] for j in range(len(placed))):
                    break
            else:
                continue
            _paste(canvas, patch, gain, y, x)
            owner[y : y + h, x : x + w][mask] = len(placed)
            counts.append(int(mask.sum()))
            placed.append(idx)
        boxes, visible = [], []
        for j in range(len(placed)):
            ys, xs = np.nonzero(owner == j)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            visible.append(len(ys) / counts[j])
        canvas += rng.normal(0.0, rng.uniform(0.02, 0.08), size=canvas.shape).astype(np.float32)
        images[i] = np.clip(canvas, 0.0, 1.0)
        all_boxes.append(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
        all_labels.append(labels[placed].astype(np.int64))
        all_items.append(np.asarray(placed, dtype=np.int64))
        all_visible.append(np.asarray(visible, dtype=np.float64))
        all_fragments.append(frags.astype(np.int64))
    return images, all_boxes, all_labels, all_items, all_visible, all_fragments


def item_pool(split: str, n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The first ``n / 10`` images per class of ``split`` ("train" or "test") as uint8 14x14, their labels."""
    raw = fashion_mnist.locate()
    part = raw.train if split == "train" else raw.test
    idx = fashion_mnist.first_per_class(part.labels, n)
    images = part.images[idx]
    if images.shape[1] == 28:
        images = fashion_mnist.halve(images)
    return images, part.labels[idx], raw.source


def make(cfg: DataConfig, split: str) -> Canvases:
    """The training or test canvases of ``cfg`` (each split from its own Fashion-MNIST split and its own
    stream of the seed)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    items, labels, source = item_pool(split, cfg.train_items if split == "train" else cfg.test_items)
    rng = np.random.default_rng([cfg.seed, 0 if split == "train" else 1])
    n = cfg.train_images if split == "train" else cfg.test_images
    images, boxes, lab, used, visible, frags = make_canvases(items, labels, n, cfg, rng)
    return Canvases(images, boxes, lab, used, visible, frags, items, split, source)
