"""Fashion-MNIST (Zalando SE, MIT licence): the subset shipped with the package, or the full set.

Where the images come from, first match wins:

1. ``data_dir`` (``--data-dir``): a folder with the four original files
   (``train-images-idx3-ubyte[.gz]`` ...; a torchvision ``FashionMNIST/raw``
   folder works too); an error if they are missing;
2. the folder named by ``$TORCH_ADAMP_FASHION_MNIST`` (an error if missing);
3. ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``);
4. the subset shipped in ``torch_adamp_reproduce/data``: the first 2,000 training and
   500 test images of each class, in file order, reduced to 14x14.

Nothing is ever downloaded. Whatever the source, a run that fits in the subset
sees exactly the same images: the selection is "the first ``n / 10`` images of
each class, in file order", and a 28x28 image destined for a size <= 14 is first
reduced to 14x14 uint8 exactly as the subset was (2x2 mean, rounded half up).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ENV_VAR = "TORCH_ADAMP_FASHION_MNIST"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
SUBSET_FILE = "fashion_mnist_subset_14x14.npz"
SUBSET_SIZE = 14
NUM_CLASSES = 10
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MEAN, STD = 0.286, 0.353  # pixel statistics of the training set, for inputs in [0, 1]
_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class DataError(Exception):
    """The requested data cannot be found or does not fit the source (one-line message)."""


@dataclass
class Split:
    """Images as uint8 ``(n, h, w)`` and labels as int64 ``(n,)``, in file order."""

    images: np.ndarray
    labels: np.ndarray


@dataclass
class RawData:
    train: Split
    test: Split
    source: str  # for messages: where the images came from


@dataclass
class Dataset:
    """Tensors ready for training: float32 ``(n, 1, size, size)`` normalised, int64 labels."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    source: str


# -- reading -----------------------------------------------------------------------------
def _read_idx(path: Path, magic: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(f"{path} is not an idx file of the expected kind (magic {found}, expected {magic})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_files(folder: Path) -> dict[str, Path] | None:
    for base in (folder, folder / "FashionMNIST" / "raw", folder / "raw"):
        found = {}
        for key, name in _FILES.items():
            for candidate in (base / f"{name}.gz", base / name):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(_FILES):
            return found
    return None


def read_full(folder: str | os.PathLike[str]) -> RawData:
    """The full 28x28 set from a folder holding the four original idx files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist")
    files = _find_files(folder)
    if files is None:
        raise DataError(f"data folder {folder} lacks the Fashion-MNIST files ({', '.join(_FILES.values())}[.gz])")
    train = Split(_read_idx(files["train_images"], 2051), _read_idx(files["train_labels"], 2049).astype(np.int64))
    test = Split(_read_idx(files["test_images"], 2051), _read_idx(files["test_labels"], 2049).astype(np.int64))
    return RawData(train, test, f"full set in {folder}")


def read_subset() -> RawData:
    """The subset shipped as package data (14x14 uint8)."""
    ref = resources.files("torch_adamp_reproduce") / "data" / SUBSET_FILE
    with ref.open("rb") as f, np.load(f) as z:
        train = Split(z["train_images"], z["train_labels"].astype(np.int64))
        test = Split(z["test_images"], z["test_labels"].astype(np.int64))
    return RawData(train, test, "subset shipped with torch-adamp-reproduce")


def locate(data_dir: str | os.PathLike[str] | None = None) -> RawData:
    """Read the first available source (see the module docstring)."""
    if data_dir is not None:
        return read_full(data_dir)
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            return read_full(env)
        except DataError as e:
            raise DataError(f"${ENV_VAR}: {e}") from None
    if _find_files(DEBIAN_DIR) is not None:
        return read_full(DEBIAN_DIR)
    return read_subset()


# -- selecting and resizing ------------------------------------------------------------
def first_per_class(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices (sorted) of the first ``n // 10`` images of each class (plus the remainder of ``n``)."""
    per_class, extra = divmod(n, NUM_CLASSES)
    picks = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        k = per_class + (1 if c < extra else 0)
        if k > len(idx):
            raise DataError(f"asked for {n} images but class {c} has only {len(idx)} in this source")
        picks.append(idx[:k])
    return np.sort(np.concatenate(picks))


def halve(images: np.ndarray) -> np.ndarray:
    """28x28 -> 14x14 uint8: mean of each 2x2 block, rounded half up (how the subset was made)."""
    n, h, w = images.shape
    blocks = images.reshape(n, h // 2, 2, w // 2, 2).astype(np.uint16).sum(axis=(2, 4))
    out: np.ndarray = ((blocks + 2) // 4).astype(np.uint8)
    return out


def to_tensor(images: np.ndarray, size: int) -> Tensor:
    """uint8 ``(n, h, w)`` -> normalised float32 ``(n, 1, size, size)`` (area resampling)."""
    if images.shape[1] == 28 and size <= SUBSET_SIZE:
        images = halve(images)
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).unsqueeze(1)
    if x.shape[-1] != size:
        x = F.adaptive_avg_pool2d(x, size)
    return x.sub_(MEAN).div_(STD)


def load(
    *,
    train_size: int,
    test_size: int,
    image_size: int,
    data_dir: str | os.PathLike[str] | None = None,
) -> Dataset:
    """Training and test tensors: the first ``n / 10`` images per class at ``image_size``."""
    if not 4 <= image_size <= 28:
        raise DataError(f"image size must be between 4 and 28, got {image_size}")
    raw = locate(data_dir)
    available = raw.train.images.shape[1]
    if image_size > available:
        raise DataError(
            f"image size {image_size} needs the full 28x28 Fashion-MNIST; the {raw.source} is {available}x{available} "
            f"(install the Debian package dataset-fashion-mnist, or pass --data-dir / set ${ENV_VAR})"
        )
    for name, n, split in (("training", train_size, raw.train), ("test", test_size, raw.test)):
        if not 1 <= n <= len(split.labels):
            raise DataError(
                f"{name} size must be between 1 and {len(split.labels)} with the {raw.source}, got {n}"
                + (f" (for more, pass --data-dir or set ${ENV_VAR})" if "subset" in raw.source else "")
            )
    tr = first_per_class(raw.train.labels, train_size)
    te = first_per_class(raw.test.labels, test_size)
    return Dataset(
        train_x=to_tensor(raw.train.images[tr], image_size),
        train_y=torch.from_numpy(raw.train.labels[tr]),
        test_x=to_tensor(raw.test.images[te], image_size),
        test_y=torch.from_numpy(raw.test.labels[te]),
        source=raw.source,
    )


def build_subset(
    folder: str | os.PathLike[str], out: str | os.PathLike[str], train_per_class: int = 2000, test_per_class: int = 500
) -> None:
    """Write the shipped subset from the full set (how ``torch_adamp_reproduce/data`` was made)."""
    raw = read_full(folder)
    tr = first_per_class(raw.train.labels, train_per_class * NUM_CLASSES)
    te = first_per_class(raw.test.labels, test_per_class * NUM_CLASSES)
    np.savez_compressed(
        out,
        train_images=halve(raw.train.images[tr]),
        train_labels=raw.train.labels[tr].astype(np.uint8),
        test_images=halve(raw.test.images[te]),
        test_labels=raw.test.labels[te].astype(np.uint8),
    )


if __name__ == "__main__":  # python -m torch_adamp_reproduce.fashion_mnist FULL_DIR OUT.npz
    import sys

    build_subset(sys.argv[1], sys.argv[2])
