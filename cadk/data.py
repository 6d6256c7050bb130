"""Datasets read from their standard on-disk formats into memory (uint8 images, int64 labels).

- fashion-mnist: IDX files (optionally .gz), by default from the Debian package dataset-fashion-mnist.
- cifar10 / cifar100: the "python version" pickle batches (data_batch_1..5 + test_batch; train + test).
ImageNet and other class-folder datasets do not fit in memory: cadk.images streams them from disk.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HELP = ("install it with `apt-get update && apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu, "
                      f"puts the IDX files in {FASHION_MNIST_DIR}) or pass --data-dir with train-images-idx3-ubyte"
                      "[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]")


class DatasetError(RuntimeError):
    """A dataset is missing or malformed; the message says how to fix it."""


Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 images [B, C, H, W], int64 labels [B]


class TrainingData(Protocol):
    """What training reads from a dataset: Dataset (in memory) and images.FolderDataset (streamed) have it."""
    name: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_channels: int
    image_size: int
    num_train: int

    def example(self) -> torch.Tensor: ...  # two training images, uint8
    def train_batches(self, epoch: int, batch_size: int, generator: torch.Generator,
                      augmented: bool = True, start: int = 0) -> Iterator[Batch]: ...  # from batch `start` on
    def eval_batches(self, batch_size: int) -> Iterator[Batch]: ...


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor  # uint8 [N, C, H, W]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]

    @property
    def num_train(self) -> int:
        return len(self.train_x)

    def example(self) -> torch.Tensor:
        return self.train_x[:2]

    def train_batches(self, epoch: int, batch_size: int, generator: torch.Generator,
                      augmented: bool = True, start: int = 0) -> Iterator[Batch]:
        """One epoch of shuffled (and augmented) batches, all drawn from `generator`, whose state checkpoints
        keep; `epoch` is not needed. The draws come in the order they always have: the permutation, then
        each batch's crops as it is taken. The first `start` batches are skipped, but their crops are still
        drawn: from the generator's state at the epoch's start, batch `start` on are those of a whole epoch."""
        pad = 4 if self.image_size >= 32 else 2
        for k, (x, y) in enumerate(batches(self.train_x, self.train_y, batch_size, True, generator)):
            if k < start:
                if augmented:
                    crop_draws(len(x), pad, generator)
                continue
            yield (augment(x, pad, generator) if augmented else x), y

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        return batches(self.test_x, self.test_y, batch_size, False)


# ---- IDX (MNIST family) -------------------------------------------------------------------------------
def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (gzip or raw): magic 0x0000 <dtype 0x08=uint8> <ndim>, big-endian dims, data."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a gzip header with a damaged stream
        raise DatasetError(f"cannot read IDX file {path}: {e}; the file is missing or corrupt "
                           "(re-download or reinstall it)") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path} is not a uint8 IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DatasetError(f"{path} is truncated: its header names {ndim} dimensions but the file holds "
                           f"{len(raw)} bytes; the file is corrupt (re-download or reinstall it)")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):  # fewer: cut off; more: another file appended or a damaged header
        problem = "is truncated" if data.size < int(np.prod(dims)) else "holds more data than its header names"
        raise DatasetError(f"{path} {problem}: header says {dims}, found {data.size} values; the file is corrupt "
                           "(re-download or reinstall it)")
    return data.reshape(dims)


def _find(folder: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    raise DatasetError(f"Fashion-MNIST file {stem}[.gz] not found in {folder}: {FASHION_MNIST_HELP}")


def load_fashion_mnist(data_dir: str | None = None) -> Dataset:
    folder = data_dir or FASHION_MNIST_DIR
    if not os.path.isdir(folder):
        raise DatasetError(f"Fashion-MNIST folder {folder} does not exist: {FASHION_MNIST_HELP}")
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
        y = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DatasetError(f"Fashion-MNIST {split} files disagree: images {x.shape}, labels {y.shape}")
        parts[split] = (torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))
    return Dataset("fashion-mnist", *parts["train"], *parts["test"], 10, (0.2860,), (0.3530,))


# ---- CIFAR python pickles -------------------------------------------------------------------------------
def _unpickle(path: str) -> dict:
    if not os.path.exists(path):
        raise DatasetError(f"CIFAR batch {path} not found: download the CIFAR 'python version' archive, "
                           "extract it, and pass its folder with --data-dir")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:  # pickle raises many types on corrupt input
        raise DatasetError(f"CIFAR batch {path} is corrupt or not a CIFAR pickle: {e}") from e


def _cifar_part(paths: list[str], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for p in paths:
        d = _unpickle(p)
        if not isinstance(d, dict) or b"data" not in d or label_key not in d:
            raise DatasetError(f"{p} lacks the keys b'data' and {label_key!r}: not a CIFAR batch of this kind")
        try:
            raw = np.asarray(d[b"data"])
            labels = np.asarray(d[label_key])
        except (TypeError, ValueError) as e:
            raise DatasetError(f"{p}: data or labels are not arrays ({e}): not a CIFAR batch") from e
        if (raw.ndim != 2 or raw.shape[1] != 3072 or labels.ndim != 1 or len(labels) != len(raw)
                or not (np.issubdtype(raw.dtype, np.integer) and np.issubdtype(labels.dtype, np.integer))):
            raise DatasetError(f"{p}: expected integer data [N, 3072] and N integer labels, got data "
                               f"{raw.shape} {raw.dtype}, labels {labels.shape} {labels.dtype}: corrupt or not a "
                               "CIFAR 'python version' batch")
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            raise DatasetError(f"{p}: pixel values span [{raw.min()}, {raw.max()}], not [0, 255]: corrupt or not "
                               "a CIFAR 'python version' batch")
        xs.append(raw.astype(np.uint8).reshape(-1, 3, 32, 32))
        ys.append(labels.astype(np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _cifar_folder(data_dir: str | None, sub: str) -> str:
    if data_dir is None:
        raise DatasetError("CIFAR cannot be downloaded here: pass --data-dir pointing at the extracted "
                           f"'python version' folder ({sub})")
    nested = os.path.join(data_dir, sub)
    return nested if os.path.isdir(nested) else data_dir


def load_cifar10(data_dir: str | None) -> Dataset:
    folder = _cifar_folder(data_dir, "cifar-10-batches-py")
    train = _cifar_part([os.path.join(folder, f"data_batch_{i}") for i in range(1, 6)], b"labels")
    test = _cifar_part([os.path.join(folder, "test_batch")], b"labels")
    return Dataset("cifar10", *train, *test, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def load_cifar100(data_dir: str | None) -> Dataset:
    folder = _cifar_folder(data_dir, "cifar-100-python")
    train = _cifar_part([os.path.join(folder, "train")], b"fine_labels")
    test = _cifar_part([os.path.join(folder, "test")], b"fine_labels")
    return Dataset("cifar100", *train, *test, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


LOADERS = {"fashion-mnist": load_fashion_mnist, "cifar10": load_cifar10, "cifar100": load_cifar100}
FOLDER_DATASETS = ("imagenet", "imagefolder")  # streamed from class folders by cadk.images
DATASETS = (*LOADERS, *FOLDER_DATASETS)


def load_dataset(name: str, data_dir: str | None = None, image_size: int = 224, workers: int | None = None,
                 seed: int = 0, pin_memory: bool = False) -> TrainingData:
    """The dataset `name` from data_dir; image_size, workers (None: images.default_workers()), seed
    (of crops and order) and pin_memory (batches for a CUDA device) apply to the streamed folder datasets only."""
    if name in FOLDER_DATASETS:
        from .images import load_image_folder

        return load_image_folder(name, data_dir, image_size, workers, seed, pin_memory)
    if name not in LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return _checked(LOADERS[name](data_dir), data_dir)


def _checked(ds: Dataset, data_dir: str | None) -> Dataset:
    """Splits that training and evaluation can use: non-empty, same image shape, labels in range (an
    out-of-range training label fails deep inside cross_entropy, an out-of-range test label silently
    counts as wrong)."""
    where = f" in {data_dir}" if data_dir else ""
    for split, x, y in (("train", ds.train_x, ds.train_y), ("test", ds.test_x, ds.test_y)):
        if len(x) == 0:
            raise DatasetError(f"{ds.name} {split} split{where} is empty: the files are truncated or not this "
                               "dataset; re-download it")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= ds.num_classes):
            raise DatasetError(f"{ds.name} {split} labels{where} span [{int(y.min())}, {int(y.max())}], outside "
                               f"[0, {ds.num_classes - 1}]: the label files are corrupt or belong to another "
                               "dataset (check --data and --data-dir)")
    if ds.train_x.shape[1:] != ds.test_x.shape[1:]:
        raise DatasetError(f"{ds.name} train and test images{where} disagree: {tuple(ds.train_x.shape[1:])} vs "
                           f"{tuple(ds.test_x.shape[1:])}; the files come from different datasets")
    if 0 in ds.train_x.shape[2:]:  # a model built for them failed with an IndexError
        raise DatasetError(f"{ds.name} images{where} have no pixels (shape {tuple(ds.train_x.shape[1:])}): the files "
                           "are corrupt or not this dataset; re-download it")
    if ds.train_x.shape[2] != ds.train_x.shape[3]:  # image_size (the models', the checkpoints') is one side
        raise DatasetError(f"{ds.name} images{where} are {ds.train_x.shape[2]}x{ds.train_x.shape[3]}, but this "
                           "dataset's images are square: the files are corrupt or not this dataset; re-download it")
    return ds


# ---- batching -----------------------------------------------------------------------------------------
def normalize(x: torch.Tensor, ds: TrainingData) -> torch.Tensor:
    mean = torch.tensor(ds.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(ds.std, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - mean) / std


def augment(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, per example, on a uint8 batch."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx, flip = crop_draws(n, pad, generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]
    out = padded[torch.arange(n)[:, None, None], :, rows, cols]  # [n, h, w, c]
    return out.permute(0, 3, 1, 2)


def crop_draws(n: int, pad: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """augment's random draws for n examples: row and column offsets, flips."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    return dy, dx, torch.rand(n, generator=generator) < 0.5


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, generator: torch.Generator | None = None):
    idx = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    for i in range(0, len(x), batch_size):
        j = idx[i:i + batch_size]
        yield x[j], y[j]
