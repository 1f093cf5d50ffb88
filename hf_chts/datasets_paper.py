"""Small offline loaders for the paper's MLP and Transformer recipes: MNIST IDX files and parallel text.

Nothing here downloads. MNIST comes from the four IDX files (``.gz`` or not) that LeCun's site and most
mirrors distribute; Multi30k (or any parallel corpus) from one sentence per line files named
``{split}.{lang}`` (``.gz`` or not). A deterministic synthetic MNIST-like set lets the MLP recipe run
anywhere.

Example:
    >>> from hf_chts.datasets_paper import synthetic_image_classification
    >>> images, labels = synthetic_image_classification(8, seed=0)
    >>> images.shape, images.dtype, labels.tolist()[:4]
    ((8, 28, 28), dtype('uint8'), [0, 1, 2, 3])
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "MNIST_FILES",
    "MNIST_MEAN",
    "MNIST_STD",
    "ImageClassificationDataset",
    "load_mnist",
    "read_idx",
    "read_parallel_corpus",
    "synthetic_image_classification",
]

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
"""Base names of the MNIST IDX files per split (each may end in ``.gz``)."""

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
"""Pixel mean and standard deviation of the MNIST training set (pixels scaled to [0, 1])."""

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"); all multi-byte values big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as handle:
        head = handle.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as handle:
        return handle.read()


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) into a numpy array of its stored shape and type.

    Raises:
        ValueError: when the header is not an IDX header or the payload size does not match it.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file (magic bytes {data[:4].hex() or 'missing'}; expected 0000, a type "
            "code such as 08 and the number of dimensions). Pass the original MNIST files."
        )
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: the IDX header announces shape {shape} ({expected} bytes) but the file holds "
            f"{len(data) - header} bytes after the header; the file is truncated or corrupt."
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_file(data_dir: Path, base: str) -> Path | None:
    # Accept the original names, their ``.gz`` form, and the common "train-images.idx3-ubyte" variant.
    dotted = base.replace("-idx", ".idx")
    for name in (base + ".gz", base, dotted + ".gz", dotted):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def load_mnist(data_dir: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64 of ``split`` ("train" or "test").

    Raises:
        FileNotFoundError: naming the missing files and what ``data_dir`` must contain.
        ValueError: on an unknown split, or images and labels of different lengths.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"Unknown MNIST split {split!r}; valid splits are 'train' and 'test'.")
    data_dir = Path(data_dir)
    paths = [_find_file(data_dir, base) for base in MNIST_FILES[split]]
    if any(p is None for p in paths):
        missing = [base for base, p in zip(MNIST_FILES[split], paths, strict=True) if p is None]
        wanted = [b + "[.gz]" for pair in MNIST_FILES.values() for b in pair]
        raise FileNotFoundError(
            f"MNIST {split} files {missing} not found in {data_dir}. Pass --data_dir pointing to a folder "
            f"with the four IDX files {wanted}, or --synthetic for a smoke test without data."
        )
    images, labels = read_idx(paths[0]), read_idx(paths[1]).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"MNIST {split}: images {images.shape} and labels {labels.shape} do not match "
            "(expected (N, 28, 28) and (N,))."
        )
    return images, labels


def synthetic_image_classification(
    num_samples: int,
    *,
    num_classes: int = 10,
    image_shape: tuple[int, int] = (28, 28),
    seed: int = 0,
    split: str = "train",
    noise: float = 60.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic MNIST-like dataset: one random smooth prototype per class plus pixel noise.

    The prototypes depend only on ``seed`` (shared by the splits); the noise also on ``split``, so "train" and
    "test" are different samples of the same classes. Labels cycle ``0, 1, ..., num_classes - 1``.

    Returns:
        ``(images, labels)``: uint8 ``(num_samples, *image_shape)`` and int64 ``(num_samples,)``.
    """
    if num_samples < 1 or num_classes < 2:
        raise ValueError(f"Need num_samples >= 1 and num_classes >= 2, got {num_samples} and {num_classes}.")
    rng = np.random.default_rng(seed)
    h, w = image_shape
    # Smooth blobs: a coarse random grid upsampled, so neighbouring pixels correlate as in real images.
    coarse = rng.random((num_classes, (h + 3) // 4, (w + 3) // 4))
    prototypes = np.kron(coarse, np.ones((4, 4)))[:, :h, :w]
    prototypes = np.where(prototypes > 0.7, 255.0, 0.0)
    split_seed = sum(split.encode()) * 1_000_003 + seed
    noise_rng = np.random.default_rng(split_seed)
    labels = np.arange(num_samples, dtype=np.int64) % num_classes
    images = prototypes[labels] + noise_rng.normal(0.0, noise, size=(num_samples, h, w))
    return np.clip(images, 0, 255).astype(np.uint8), labels


class ImageClassificationDataset(torch.utils.data.Dataset):
    """Flattened, normalised images for an MLP: items ``{"pixel_values": (H*W,) float32, "labels": int64}``.

    Args:
        images (`np.ndarray`): uint8 ``(N, H, W)``.
        labels (`np.ndarray`): int ``(N,)``.
        mean, std (`float`): normalisation of pixels scaled to [0, 1] (MNIST statistics by default).
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, mean: float = MNIST_MEAN, std: float = MNIST_STD
    ):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels.")
        self.images = torch.from_numpy(np.ascontiguousarray(images).reshape(len(images), -1))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.mean, self.std = float(mean), float(std)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pixels = (self.images[index].float() / 255.0 - self.mean) / self.std
        return {"pixel_values": pixels, "labels": self.labels[index]}


def _read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [line.rstrip("\r\n") for line in handle]


def _parallel_file(data_dir: Path, split: str, lang: str) -> Path | None:
    for name in (f"{split}.{lang}.gz", f"{split}.{lang}"):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def read_parallel_corpus(
    data_dir: str | os.PathLike,
    split: str,
    src_lang: str = "en",
    tgt_lang: str = "de",
    max_samples: int | None = None,
) -> tuple[list[str], list[str]]:
    """Aligned source and target sentences of ``split`` from ``{split}.{lang}[.gz]`` files.

    ``split="test"`` falls back to Multi30k's ``test_2016_flickr`` when no ``test.{lang}`` file exists. Pairs
    with an empty side are dropped; ``max_samples`` keeps the first pairs.

    Raises:
        FileNotFoundError: naming the files looked for.
        ValueError: when the two sides have different numbers of lines.
    """
    data_dir = Path(data_dir)
    names = [split] + (["test_2016_flickr"] if split == "test" else [])
    for name in names:
        src, tgt = _parallel_file(data_dir, name, src_lang), _parallel_file(data_dir, name, tgt_lang)
        if src is not None and tgt is not None:
            break
    else:
        raise FileNotFoundError(
            f"No parallel files for split {split!r} in {data_dir}: looked for "
            f"{[f'{n}.{lang}[.gz]' for n in names for lang in (src_lang, tgt_lang)]}. Pass --data_dir "
            "pointing to a folder of one-sentence-per-line files (Multi30k: train/val/test_2016_flickr)."
        )
    sources, targets = _read_lines(src), _read_lines(tgt)
    if len(sources) != len(targets):
        raise ValueError(
            f"{src} has {len(sources)} lines but {tgt} has {len(targets)}; the files are not aligned."
        )
    pairs = [(s.strip(), t.strip()) for s, t in zip(sources, targets, strict=True) if s.strip() and t.strip()]
    if max_samples is not None:
        pairs = pairs[:max_samples]
    return [s for s, _ in pairs], [t for _, t in pairs]
