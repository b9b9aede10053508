"""Object detection: a CenterNet-style detector trained from scratch, scored with COCO AP (pycocotools).

The paper's detection benchmark is CenterNet (and SSD) on COCO, from scratch
and from ImageNet weights. Here, a small CenterNet (Zhou et al., "Objects as
Points", 2019) is trained from scratch on the canvases of
:mod:`.detection_data` (Fashion-MNIST items pasted on cluttered textured
backgrounds, 10 classes):

- **backbone**: conv-BN-ReLU blocks without conv bias (so every conv weight is
  scale-invariant), stride 4 and stride 8 stages, the stride-8 features
  upsampled (nearest) onto the stride-4 ones through a 1x1 conv-BN (a one-level
  feature pyramid, as CenterNet's ResNet and DLA variants upsample), then one
  more conv-BN-ReLU: a ``size / 4`` feature map;
- **heads**, as CenterNet's: each a 3x3 conv with bias, ReLU and a 1x1 conv --
  a class heatmap (one channel per class, its bias set to -2.19 so that it starts
  at 0.1), the box size (width, height in output cells) and the sub-cell
  offset of the centre;
- **losses**: CenterNet's penalty-reduced focal loss on the heatmap (alpha 2,
  beta 4, Gaussian targets with CenterNet's radius at overlap 0.7) plus L1 on
  the size (weight 0.1) and the offset (weight 1) at the objects' centres;
- **decoding**: a 3x3 max-pool keeps the heatmap's local peaks, then the
  top-``k`` peaks over all classes become boxes (score = the peak's value);
- **score**: COCO AP (mean over IoU 0.50:0.95), AP50 and AP75, computed by
  ``pycocotools``' ``COCOeval`` (the reference implementation), boxes in pixels.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import fashion_mnist
from ..training import LABELS
from . import detection_data
from .common import Experiment, Metric, index_batches

PAPER = {
    "pair": "adamw",
    "text": "COCO AP, Adam -> AdamP: CenterNet from scratch 26.57 -> 27.11 (+0.54), with ImageNet init "
    "28.29 -> 29.05 (+0.76); SSD from scratch 27.10 -> 27.97 (+0.87), with ImageNet init 28.39 -> 28.67 (+0.28)",
    "gain": "+0.54 (CenterNet, scratch)",
}
STRIDE = 4
#: how many test images the sample-detection PNG shows (their detections are kept in results.json)
SAMPLES = 6


@dataclass
class Config:
    epochs: int = 3
    batch_size: int = 32
    width: int = 16
    head: int = 32
    top_k: int = 20
    lr: float = 1e-2  # from scripts/reproduce_lr_search.py (docs/reproduction.md)
    weight_decay: float = 0.1
    data: detection_data.DataConfig = field(default_factory=detection_data.DataConfig)


# -- the model ------------------------------------------------------------------------------------
def _block(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _head(cin: int, mid: int, cout: int, bias: float = 0.0) -> nn.Sequential:
    head = nn.Sequential(nn.Conv2d(cin, mid, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(mid, cout, 1))
    last = head[-1]
    assert isinstance(last, nn.Conv2d) and last.bias is not None
    nn.init.constant_(last.bias, bias)
    return head


class CenterNet(nn.Module):
    """BN-CNN backbone (stride 4, with the stride-8 stage upsampled onto it) and CenterNet's three heads.
    Input: normalised grey images ``(n, 1, s, s)``; output: heatmap logits ``(n, classes, s/4, s/4)``,
    size and offset ``(n, 2, s/4, s/4)``."""

    def __init__(self, width: int = 16, head: int = 32, num_classes: int = fashion_mnist.NUM_CLASSES) -> None:
        super().__init__()
        w = width
        self.stage4 = nn.Sequential(*_block(1, w, 2), *_block(w, 2 * w, 2), *_block(2 * w, 2 * w, 1))
        self.stage8 = nn.Sequential(*_block(2 * w, 4 * w, 2), *_block(4 * w, 4 * w, 1))
        self.lateral = nn.Sequential(nn.Conv2d(4 * w, 2 * w, 1, bias=False), nn.BatchNorm2d(2 * w))
        self.fuse = nn.Sequential(*_block(2 * w, 2 * w, 1))
        self.heatmap = _head(2 * w, head, num_classes, bias=-2.19)  # sigmoid(-2.19) = 0.1, as CenterNet
        self.size = _head(2 * w, head, 2)
        self.offset = _head(2 * w, head, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = self.stage4(x)
        b = self.lateral(self.stage8(a))
        f = self.fuse(F.relu(a + F.interpolate(b, scale_factor=2.0, mode="nearest")))
        return self.heatmap(f), self.size(f), self.offset(f)


def backbone_weights(model: nn.Module) -> list[str]:
    """The conv weights followed by BatchNorm (scale-invariant): every conv outside the heads."""
    return [
        f"{n}.weight"
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and not n.startswith(("heatmap", "size", "offset"))
    ]


def head_weights(model: nn.Module) -> list[str]:
    """The heads' conv weights (bias, no BatchNorm: not scale-invariant); their projection share is recorded."""
    return [
        f"{n}.weight"
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and n.startswith(("heatmap", "size", "offset"))
    ]


# -- targets and losses ---------------------------------------------------------------------------------
def gaussian_radius(height: float, width: float, min_overlap: float = 0.7) -> float:
    """CenterNet's (CornerNet's) radius: the smallest of the three corner-displacement cases that keep a box
    of this size above ``min_overlap`` IoU with the ground truth."""
    a1, b1 = 1.0, height + width
    c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1**2 - 4 * a1 * c1)) / 2
    a2, b2 = 4.0, 2 * (height + width)
    c2 = (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2**2 - 4 * a2 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
    c3 = (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


def draw_gaussian(heatmap: np.ndarray, cx: int, cy: int, radius: int) -> None:
    """CenterNet's ``draw_umich_gaussian``: the element-wise max of ``heatmap`` and a Gaussian of diameter
    ``2 radius + 1`` (sigma = diameter / 6) centred on ``(cx, cy)``, 1 at the centre."""
    d = 2 * radius + 1
    sigma = d / 6
    ys, xs = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    g = np.exp(-(xs * xs + ys * ys) / (2 * sigma * sigma))
    g[g < np.finfo(g.dtype).eps * g.max()] = 0
    h, w = heatmap.shape
    left, right = min(cx, radius), min(w - cx, radius + 1)
    top, bottom = min(cy, radius), min(h - cy, radius + 1)
    region = heatmap[cy - top : cy + bottom, cx - left : cx + right]
    np.maximum(region, g[radius - top : radius + bottom, radius - left : radius + right], out=region)


@dataclass
class Targets:
    """CenterNet's training targets: ``heatmap`` ``(n, classes, s/4, s/4)``; per object slot (``max_objects``
    per image): ``index`` (flat cell of the centre), ``size`` and ``offset`` ``(n, m, 2)``, ``mask`` ``(n, m)``."""

    heatmap: Tensor
    index: Tensor
    size: Tensor
    offset: Tensor
    mask: Tensor


def make_targets(
    boxes: list[np.ndarray], labels: list[np.ndarray], size: int, max_objects: int, num_classes: int
) -> Targets:
    out = size // STRIDE
    n = len(boxes)
    heat = np.zeros((n, num_classes, out, out), dtype=np.float32)
    index = np.zeros((n, max_objects), dtype=np.int64)
    wh = np.zeros((n, max_objects, 2), dtype=np.float32)
    off = np.zeros((n, max_objects, 2), dtype=np.float32)
    mask = np.zeros((n, max_objects), dtype=np.float32)
    for i, (bs, ls) in enumerate(zip(boxes, labels, strict=True)):
        for j, (b, c) in enumerate(zip(bs / STRIDE, ls, strict=True)):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            centre = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2], dtype=np.float32)
            cell = np.minimum(centre.astype(np.int64), out - 1)
            radius = max(0, int(gaussian_radius(math.ceil(h), math.ceil(w))))
            draw_gaussian(heat[i, c], int(cell[0]), int(cell[1]), radius)
            index[i, j] = cell[1] * out + cell[0]
            wh[i, j] = (w, h)
            off[i, j] = centre - cell
            mask[i, j] = 1.0
    return Targets(*(torch.from_numpy(a) for a in (heat, index, wh, off, mask)))


def focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss (alpha 2, beta 4), normalised by the number of
    objects (the cells where the target is 1); the prediction is ``sigmoid(logits)`` clamped to
    [1e-4, 1 - 1e-4] as in CenterNet."""
    p = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1).float()
    pos_loss = torch.log(p) * (1 - p) ** 2 * pos
    neg_loss = torch.log(1 - p) * p**2 * (1 - target) ** 4 * (1 - pos)
    return -(pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1.0)


def gather(feature: Tensor, index: Tensor) -> Tensor:
    """``(n, c, h, w)`` features at flat cells ``(n, m)`` -> ``(n, m, c)``."""
    n, c = feature.shape[:2]
    flat = feature.reshape(n, c, -1)
    return flat.gather(2, index[:, None, :].expand(n, c, index.shape[1])).transpose(1, 2)


def reg_l1(pred: Tensor, index: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """CenterNet's ``RegL1Loss``: L1 at the objects' centre cells, summed, over the number of masked values."""
    m = mask[:, :, None].expand_as(target)
    return F.l1_loss(gather(pred, index) * m, target * m, reduction="sum") / (m.sum() + 1e-4)


def centernet_loss(outputs: tuple[Tensor, Tensor, Tensor], t: Targets) -> Tensor:
    """Focal loss + 0.1 x size L1 + 1 x offset L1 (CenterNet's weights)."""
    heat, size, offset = outputs
    return (
        focal_loss(heat, t.heatmap)
        + 0.1 * reg_l1(size, t.index, t.size, t.mask)
        + reg_l1(offset, t.index, t.offset, t.mask)
    )


def decode(outputs: tuple[Tensor, Tensor, Tensor], k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` heatmap peaks (3x3 max-pool suppression) over all classes -> boxes ``(n, k, 4)`` as
    ``(x0, y0, x1, y1)`` in input pixels, scores ``(n, k)`` and classes ``(n, k)``."""
    heat_logits, size, offset = outputs
    heat = heat_logits.sigmoid()
    heat = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    n, c, h, w = heat.shape
    scores, flat = heat.reshape(n, -1).topk(min(k, c * h * w))
    classes, cell = flat // (h * w), flat % (h * w)
    ys, xs = (cell // w).float(), (cell % w).float()
    wh, off = gather(size, cell), gather(offset, cell)
    cx, cy = xs + off[..., 0], ys + off[..., 1]
    half_w, half_h = wh[..., 0] / 2, wh[..., 1] / 2
    boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], -1) * STRIDE
    return boxes, scores, classes


# -- the score: pycocotools --------------------------------------------------------------------------
def coco_ap(
    gt_boxes: list[np.ndarray],
    gt_labels: list[np.ndarray],
    boxes: list[np.ndarray],
    scores: list[np.ndarray],
    labels: list[np.ndarray],
    num_classes: int = fashion_mnist.NUM_CLASSES,
) -> dict[str, float]:
    """COCO AP, AP50 and AP75 in percent (``COCOeval(..., "bbox")``, its default parameters: 10 IoU
    thresholds 0.50:0.95, 101 recall points, at most 100 detections per image) of the detections
    ``boxes``/``scores``/``labels`` against ``gt_boxes``/``gt_labels``, one array per image, boxes as
    ``(x0, y0, x1, y1)``. Classes are numbered from 0 here (categories 1.. for pycocotools); the ground
    truth's area, which only the size-bucketed APs use, is its box's."""
    from pycocotools.coco import COCO  # type: ignore[import-untyped]
    from pycocotools.cocoeval import COCOeval  # type: ignore[import-untyped]

    if len(gt_boxes) != len(boxes):
        raise ValueError(f"coco_ap: {len(gt_boxes)} images of ground truth but {len(boxes)} of detections")
    annotations: list[dict[str, Any]] = []
    for i, (bs, ls) in enumerate(zip(gt_boxes, gt_labels, strict=True)):
        for b, c in zip(np.asarray(bs, dtype=np.float64).reshape(-1, 4), ls, strict=True):
            w, h = b[2] - b[0], b[3] - b[1]
            bbox = [float(b[0]), float(b[1]), float(w), float(h)]
            annotations.append(
                {"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(c) + 1, "bbox": bbox}
                | {"area": float(w * h), "iscrowd": 0}
            )
    rows = [
        [i + 1, b[0], b[1], b[2] - b[0], b[3] - b[1], s, c + 1]
        for i, (bs, ss, cs) in enumerate(zip(boxes, scores, labels, strict=True))
        for b, s, c in zip(np.asarray(bs, dtype=np.float64).reshape(-1, 4), ss, cs, strict=True)
    ]
    if not rows or not annotations:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and its table
        gt = COCO()
        gt.dataset = {
            "images": [{"id": i + 1} for i in range(len(gt_boxes))],
            "categories": [{"id": c + 1} for c in range(num_classes)],
            "annotations": annotations,
        }
        gt.createIndex()
        dt = gt.loadRes(np.asarray(rows, dtype=np.float64))
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # stats[k] is -1 where no ground truth exists (cannot happen here: every image set has objects)
    return {"ap": 100.0 * float(ev.stats[0]), "ap50": 100.0 * float(ev.stats[1]), "ap75": 100.0 * float(ev.stats[2])}


# -- the task -------------------------------------------------------------------------------------------------
def normalise(images: np.ndarray, mean: float, std: float) -> Tensor:
    return ((torch.from_numpy(images) - mean) / std).unsqueeze(1)


def detect(model: nn.Module, x: Tensor, k: int, chunk: int = 250) -> tuple[list[np.ndarray], ...]:
    """Decoded detections per image (boxes, scores, classes as numpy), the model as it is (eval mode: the
    caller's)."""
    out: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            for part, t in zip(out, decode(model(x[i : i + chunk]), k), strict=True):
                part.extend(t.numpy())
    return out


def experiment(cfg: Config) -> Experiment:
    train = detection_data.make(cfg.data, "train")
    test = detection_data.make(cfg.data, "test")
    mean, std = float(train.images.mean()), float(train.images.std())
    xtr, xte = normalise(train.images, mean, std), normalise(test.images, mean, std)
    t = make_targets(train.boxes, train.labels, cfg.data.size, cfg.data.max_objects, fashion_mnist.NUM_CLASSES)

    def loss(model: nn.Module, idx: Any) -> Tensor:
        part = Targets(t.heatmap[idx], t.index[idx], t.size[idx], t.offset[idx], t.mask[idx])
        return centernet_loss(model(xtr[idx]), part)

    def evaluate(model: nn.Module) -> dict[str, float]:
        boxes, scores, classes = detect(model, xte, cfg.top_k)
        return coco_ap(test.boxes, test.labels, boxes, scores, classes)

    def final(model: nn.Module) -> dict[str, Any]:
        boxes, scores, classes = detect(model, xte[:SAMPLES], cfg.top_k)
        return {
            "sample_detections": [
                {"boxes": b.round(2).tolist(), "scores": s.round(4).tolist(), "classes": c.tolist()}
                for b, s, c in zip(boxes, scores, classes, strict=True)
            ]
        }

    def extra_plots(results: dict[str, Any], out: Path) -> list[Path]:
        return [plot_dataset(test, out / "dataset.png"), plot_detections(results, test, out / "detections.png")]

    s = train.stats()
    return Experiment(
        name="detection",
        title="Detection: CenterNet from scratch on Fashion-MNIST canvases, COCO AP",
        optimizers=("adamw", "adamp"),
        metrics=(Metric("ap", "AP (%)"), Metric("ap50", "AP50 (%)"), Metric("ap75", "AP75 (%)")),
        make_model=lambda: CenterNet(cfg.width, cfg.head),
        batches=lambda gen: index_batches(len(xtr), cfg.batch_size, gen),
        steps_per_epoch=len(xtr) // cfg.batch_size,
        loss=loss,
        evaluate=evaluate,
        tracked=backbone_weights,
        watched=head_weights,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        epochs=cfg.epochs,
        evals_per_epoch=1,
        final=final,
        extra_plots=extra_plots,
        data_note=f"{len(xtr)} training / {len(xte)} test {cfg.data.size}x{cfg.data.size} canvases of Fashion-MNIST "
        f"14x14 items ({train.source}; test canvases from test items), {s['objects_per_image']:.1f} objects per "
        f"image, {100 * s['small_share']:.0f}% under 16 px, {100 * s['occluded_share']:.0f}% occluded",
    )


# -- pictures -----------------------------------------------------------------------------------------------
SHORT = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")
CLASS_COLOURS = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "gold",
    "tab:olive",
    "tab:cyan",
)


def _draw(ax: Any, image: np.ndarray, boxes: Any, classes: Any, scores: Any = None, ls: str = "-") -> None:
    from matplotlib.patches import Rectangle

    ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for i, (b, c) in enumerate(zip(boxes, classes, strict=True)):
        colour = CLASS_COLOURS[int(c)]
        ax.add_patch(
            Rectangle((b[0] - 0.5, b[1] - 0.5), b[2] - b[0], b[3] - b[1], fill=False, ec=colour, lw=1.2, ls=ls)
        )
        text = SHORT[int(c)] + ("" if scores is None else f" {scores[i]:.2f}")
        ax.text(b[0] - 0.5, b[1] - 1.0, text, color=colour, fontsize=6, va="bottom")
    ax.set(xticks=[], yticks=[], xlim=(-0.5, image.shape[1] - 0.5), ylim=(image.shape[0] - 0.5, -0.5))


def plot_dataset(data: detection_data.Canvases, path: Path, n: int = 12) -> Path:
    """The first ``n`` canvases with their boxes and labels."""
    from matplotlib.figure import Figure

    cols = 6
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.2 * cols, 2.2 * rows + 0.3), layout="constrained")
    for ax, i in zip(fig.subplots(rows, cols, squeeze=False).ravel(), range(n), strict=False):
        _draw(ax, data.images[i], data.boxes[i], data.labels[i])
    fig.suptitle(f"{data.split} canvases ({data.images.shape[1]}x{data.images.shape[2]}) with their boxes")
    fig.savefig(path, dpi=110)
    return path


def plot_detections(results: dict[str, Any], data: detection_data.Canvases, path: Path, min_score: float = 0.3) -> Path:
    """The first test images: ground truth (white, dashed) and each optimizer's detections scoring at least
    ``min_score`` (first seed's final model), one row per optimizer."""
    from matplotlib.figure import Figure

    names = results["hyperparameters"]["optimizers"]
    seed = min(r["seed"] for r in results["runs"])
    runs = {r["optimizer"]: r for r in results["runs"] if r["seed"] == seed}
    n = len(runs[names[0]]["extras"]["sample_detections"])
    fig = Figure(figsize=(2.2 * n, 2.3 * (len(names) + 1) + 0.3), layout="constrained")
    axes = fig.subplots(len(names) + 1, n, squeeze=False)
    for i in range(n):
        _draw(axes[0, i], data.images[i], data.boxes[i], data.labels[i])
        for row, name in enumerate(names, start=1):
            d = runs[name]["extras"]["sample_detections"][i]
            keep = [j for j, s in enumerate(d["scores"]) if s >= min_score]
            _draw(
                axes[row, i],
                data.images[i],
                [d["boxes"][j] for j in keep],
                [d["classes"][j] for j in keep],
                [d["scores"][j] for j in keep],
            )
    axes[0, 0].set_ylabel("ground truth")
    for row, name in enumerate(names, start=1):
        ap = runs[name]["metrics"]["ap"]
        axes[row, 0].set_ylabel(f"{LABELS[name]} (AP {ap:.1f})")
    fig.suptitle(f"test images: detections scoring >= {min_score:g}, seed {seed}")
    fig.savefig(path, dpi=110)
    return path
