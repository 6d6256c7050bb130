"""Image-folder datasets streamed from disk: ImageNet (ILSVRC2012) and any other tree of class folders.

Layouts under --data-dir DIR (ImageNet's standard ones):
- DIR/train/<class>/*.JPEG; class index = position of the folder name in sorted order, as torchvision's
  ImageFolder and the usual ImageNet scripts number them;
- DIR/val/<class>/*.JPEG, or a flat DIR/val/*.JPEG labelled by DIR/LOC_val_solution.csv (the Kaggle
  distribution, which is also found from its own root through DIR/ILSVRC/Data/CLS-LOC).
Images are decoded with Pillow on access, in DataLoader workers. Each training crop and flip comes from
(seed, epoch, image index) and each epoch's order from (seed, epoch): batches do not depend on the number of
workers, and a resumed run sees the batches an uninterrupted one would.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.utils.data

from .data import DatasetError

try:
    from PIL import Image
except ImportError:  # loading a folder dataset says how to install it
    Image = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTENSIONS = (b".jpeg", b".jpg", b".png", b".bmp", b".ppm", b".pgm", b".tif", b".tiff", b".webp")
SOLUTION_CSV = "LOC_val_solution.csv"
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # random-resized crop: share of the area, aspect ratio
LAYOUT_HELP = (f"expected DIR/train/<class>/*.JPEG and either DIR/val/<class>/*.JPEG or flat DIR/val/*.JPEG with "
               f"DIR/{SOLUTION_CSV} (ImageNet's standard layouts), passed as --data-dir DIR")


# ---- scanning ---------------------------------------------------------------------------------------------
@dataclass
class Split:
    """One split's image files. Paths are bytes relative to `root`, in one numpy array: 1.28M of them take
    tens of MB, which DataLoader workers share instead of copying as they would Python strings."""
    root: bytes
    files: np.ndarray   # bytes_ [N]
    labels: np.ndarray  # int64 [N]

    def path(self, i: int) -> str:
        return os.fsdecode(os.path.join(self.root, self.files[i]))


def _class_folders(folder: bytes) -> list[bytes]:
    with os.scandir(folder) as entries:  # hidden folders (.ipynb_checkpoints, ...) are no classes
        return sorted(e.name for e in entries if not e.name.startswith(b".") and e.is_dir())


def _image_names(folder: bytes, nested: bool = False) -> list[bytes]:
    """The image files in `folder`, and with `nested` in its non-hidden subfolders too (as torchvision's
    ImageFolder reads a class folder), as sorted paths relative to it."""
    names, subfolders = [], []
    with os.scandir(folder) as entries:
        for e in entries:
            if e.name.startswith(b"."):  # macOS copies leave an AppleDouble '._<name>.JPEG' beside each image
                continue
            # extension first: is_file() then costs no stat on file systems that report entry types
            if e.name.lower().endswith(EXTENSIONS) and e.is_file():
                names.append(e.name)
            elif nested and e.is_dir(follow_symlinks=False):  # a linked folder could lead back up: a loop
                subfolders.append(e.name)
    for sub in subfolders:
        names += [os.path.join(sub, n) for n in _image_names(os.path.join(folder, sub), nested)]
    return sorted(names)


def _split(root: bytes, files: list[bytes], labels: list[int]) -> Split:
    return Split(root, np.array(files, dtype=np.bytes_), np.array(labels, dtype=np.int64))


def _scan_class_folders(folder: bytes, index: dict[bytes, int]) -> Split:
    """The images of every class folder in `folder`; each folder must name a class of `index`."""
    files, labels = [], []
    for name in _class_folders(folder):
        where = os.fsdecode(os.path.join(folder, name))
        if name not in index:
            raise DatasetError(f"class folder {where} has no counterpart in the train folder: the splits come from "
                               "different datasets or the train folder is incomplete; remove it or add the class")
        names = _image_names(os.path.join(folder, name), nested=True)
        if not names:
            raise DatasetError(f"class folder {where} holds no images ({', '.join(e.decode() for e in EXTENSIONS)}): "
                               "add its images or remove the folder")
        files += [os.path.join(name, n) for n in names]
        labels += [index[name]] * len(names)
    return _split(folder, files, labels)


def read_solution(path: str) -> dict[str, str]:
    """ImageNet's LOC_val_solution.csv: `ImageId,PredictionString` rows, the first token of which is the
    image's class (wnid), followed by its boxes."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's re-save starts with a BOM
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"cannot read {path} ({e}): the file is corrupt; download it again") from e
    if not rows or [c.strip() for c in rows[0][:2]] != ["ImageId", "PredictionString"]:
        raise DatasetError(f"{path} does not start with the line 'ImageId,PredictionString': not ImageNet's "
                           f"{SOLUTION_CSV}; download it again")
    labels = {}
    for line, row in enumerate(rows[1:], 2):
        if len(row) < 2 or not row[1].split():
            raise DatasetError(f"{path} line {line} holds no 'ImageId,wnid ...' pair: the file is corrupt; "
                               "download it again")
        labels[row[0].strip()] = row[1].split()[0]
    return labels


def _scan_flat(folder: bytes, csv_paths: list[str], index: dict[bytes, int]) -> Split:
    """A flat validation folder labelled by the first LOC_val_solution.csv of `csv_paths` that exists."""
    found = [p for p in csv_paths if os.path.isfile(p)]
    if not found:
        raise DatasetError(f"{os.fsdecode(folder)} holds images but no class folders, and {SOLUTION_CSV}, which "
                           f"labels them, is not in {' or '.join(sorted(set(map(os.path.dirname, csv_paths))))}: "
                           f"put the Kaggle {SOLUTION_CSV} there, or sort the images into class folders")
    solution = read_solution(found[0])
    names = _image_names(folder)
    labels = []
    for name in names:
        image_id = os.path.splitext(os.fsdecode(name))[0]
        if image_id not in solution:
            raise DatasetError(f"{found[0]} has no row for {os.fsdecode(os.path.join(folder, name))}: the csv belongs "
                               "to another release; use the one that came with these images")
        wnid = solution[image_id].encode()
        if wnid not in index:
            raise DatasetError(f"{found[0]} labels {image_id} with class {wnid.decode()}, which has no folder in the "
                               "train folder: the splits come from different datasets or the train folder is "
                               "incomplete")
        labels.append(index[wnid])
    return _split(folder, names, labels)


def _root(data_dir: str | None) -> str:
    if data_dir is None:
        raise DatasetError(f"image-folder datasets are read from disk, not downloaded: {LAYOUT_HELP}")
    if not os.path.isdir(data_dir):
        raise DatasetError(f"--data-dir {data_dir} is not a folder: {LAYOUT_HELP}")
    kaggle = os.path.join(data_dir, "ILSVRC", "Data", "CLS-LOC")
    return kaggle if os.path.isdir(kaggle) else data_dir


def scan(data_dir: str | None) -> tuple[list[str], Split, Split]:
    """Class names and the train and validation splits under data_dir (see the module's layouts)."""
    root = _root(data_dir)
    train_dir, val_dir = (os.fsencode(os.path.join(root, s)) for s in ("train", "val"))
    for folder in (train_dir, val_dir):
        if not os.path.isdir(folder):
            raise DatasetError(f"{os.fsdecode(folder)} is missing: {LAYOUT_HELP}")
    classes = _class_folders(train_dir)
    if not classes:
        raise DatasetError(f"{os.fsdecode(train_dir)} holds no class folders: {LAYOUT_HELP}")
    index = {name: i for i, name in enumerate(classes)}
    train = _scan_class_folders(train_dir, index)
    if _class_folders(val_dir):
        val = _scan_class_folders(val_dir, index)
    elif _image_names(val_dir):
        val = _scan_flat(val_dir, [os.path.join(d, SOLUTION_CSV) for d in (root, data_dir)], index)
    else:
        raise DatasetError(f"{os.fsdecode(val_dir)} holds neither class folders nor images: {LAYOUT_HELP}")
    return [os.fsdecode(c) for c in classes], train, val


# ---- decoding and crops -------------------------------------------------------------------------------------
def decode(path: str) -> "Image.Image":
    """The image at path in RGB (ImageNet holds some grayscale and CMYK JPEGs; alpha is dropped; 16-bit
    values are scaled to 8 bits)."""
    try:
        with Image.open(path) as img:
            if img.mode.startswith("I"):  # 16-bit grayscale (I;16*, or I): convert() clips each value at 255
                return Image.fromarray((np.clip(np.asarray(img), 0, 65535) >> 8).astype(np.uint8)).convert("RGB")
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read image {path} ({type(e).__name__}: {e}): the file is unreadable, corrupt "
                           "or not an image; replace or delete it") from e


def train_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's random-resized crop: 8-100% of the area at an aspect ratio of 3/4-4/3 (log-uniform),
    10 tries, then the centre crop at the nearest allowed aspect ratio. (left, top, right, bottom)."""
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        area = width * height * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    aspect = min(max(width / height, RATIO[0]), RATIO[1])
    w, h = min(width, round(height * aspect)), min(height, round(width / aspect))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def eval_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The centre size x size crop after resizing the shorter side to size * 256/224, as a box in the image."""
    side = min(width, height) * size / round(size * 256 / 224)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def crop(img: "Image.Image", box: tuple, size: int, flip: bool = False) -> torch.Tensor:
    """The box of img resized to size x size (Pillow's antialiased bilinear), uint8 [3, size, size]."""
    out = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(out).transpose(2, 0, 1)))


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator determined by (seed, *keys) alone. SeedSequence takes no negative numbers; --seed may be one."""
    return np.random.default_rng([seed % 2**64, *keys])


class Images(torch.utils.data.Dataset):
    """One split decoded on access: with an epoch, training views whose crop and flip come from
    (seed, epoch, index) alone, the same in any worker and any run; without one, evaluation views.
    Items are (image, label, error): a file that cannot be read gives its error text (and a blank image),
    which the main process raises as a DatasetError instead of a worker's traceback."""

    def __init__(self, split: Split, size: int, seed: int, epoch: int | None = None):
        self.split, self.size, self.seed, self.epoch = split, size, seed, epoch

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        label = int(self.split.labels[i])
        try:
            img = decode(self.split.path(i))
        except DatasetError as e:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), label, str(e)
        if self.epoch is None:
            return crop(img, eval_box(*img.size, self.size), self.size), label, ""
        rng = _rng(self.seed, self.epoch, int(i))
        box = train_box(*img.size, rng)
        return crop(img, box, self.size, flip=rng.random() < 0.5), label, ""


# ---- the dataset training reads -----------------------------------------------------------------------------
class FolderDataset:
    """A class-folder dataset streamed from disk, read by training through the same methods as data.Dataset."""

    in_channels = 3
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, name: str, classes: list[str], train: Split, test: Split, image_size: int, workers: int,
                 seed: int, pin_memory: bool = False):
        self.name, self.classes, self.train, self.test = name, classes, train, test
        self.num_classes, self.image_size, self.workers, self.seed = len(classes), image_size, workers, seed
        self.pin_memory = pin_memory  # for a CUDA run only: pinning opens a CUDA context, on GPU 0

    @property
    def num_train(self) -> int:
        return len(self.train.labels)

    def example(self) -> torch.Tensor:
        """Evaluation views of the first two training images (decoded here: no workers for two images)."""
        images = Images(self.train, self.image_size, self.seed)
        return next(self._batches(images, range(min(2, self.num_train)), 2, workers=0))[0]

    def train_batches(self, epoch: int, batch_size: int, generator: torch.Generator | None = None,
                      augmented: bool = True, start: int = 0):
        """Epoch `epoch`'s uint8 batches from batch `start` on, in an order drawn from (seed, epoch);
        `generator` is not used. Skipped batches are not decoded."""
        order = _rng(self.seed, epoch).permutation(self.num_train)[start * batch_size:]
        images = Images(self.train, self.image_size, self.seed, epoch if augmented else None)
        return self._batches(images, order, batch_size)

    def eval_batches(self, batch_size: int):
        return self._batches(Images(self.test, self.image_size, self.seed), range(len(self.test.labels)), batch_size)

    def _batches(self, images: Images, order, batch_size: int, workers: int | None = None):
        loader = torch.utils.data.DataLoader(images, batch_size, sampler=order,
                                             num_workers=self.workers if workers is None else workers,
                                             pin_memory=self.pin_memory)
        for x, y, errors in _worker_deaths_named(loader):
            for error in errors:
                if error:
                    raise DatasetError(error)
            yield x, y


def _worker_deaths_named(loader):
    """The loader's batches; a worker process that died (most often at the hands of the system's out-of-memory
    killer) is a DatasetError saying what to change, not a DataLoader traceback."""
    try:
        yield from loader
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        raise DatasetError(f"an image-decoding worker process died ({e}); the system may have run out of memory: "
                           "pass fewer --workers or a smaller --batch-size") from e


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def load_image_folder(name: str, data_dir: str | None, image_size: int = 224, workers: int | None = None,
                      seed: int = 0, pin_memory: bool = False) -> FolderDataset:
    """--data imagenet (which must have ImageNet's 1000 classes) or imagefolder (any number of classes)."""
    if Image is None:
        raise DatasetError(f"--data {name} decodes images with Pillow, which is not installed: pip install pillow "
                           "(or pip install 'cadk[images]')")
    classes, train, test = scan(data_dir)
    if name == "imagenet" and len(classes) != 1000:
        raise DatasetError(f"ImageNet (ILSVRC2012) has 1000 classes, but {os.fsdecode(train.root)} holds "
                           f"{len(classes)} class folders: the copy is incomplete or another dataset; for other "
                           "class-folder datasets use --data imagefolder")
    return FolderDataset(name, classes, train, test, image_size, default_workers() if workers is None else workers,
                         seed, pin_memory)
