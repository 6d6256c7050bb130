"""Dataset readers on small files in the standard formats, and their errors."""
import gzip
import os
import pickle
import shutil
import struct

import numpy as np
import pytest
import torch

from cadk import data as D


def write_idx(path, array, compress=True):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(payload)


def make_fashion_mnist(folder, n_train=64, n_test=32, compress=True, seed=0):
    rng = np.random.default_rng(seed)
    ext = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", rng.integers(0, 10, (n,)), compress)
    return folder


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx_reader(tmp_path, compress):
    make_fashion_mnist(tmp_path, compress=compress)
    ds = D.load_dataset("fashion-mnist", str(tmp_path))
    assert ds.train_x.shape == (64, 1, 28, 28) and ds.train_x.dtype == torch.uint8
    assert ds.test_y.shape == (32,) and ds.num_classes == 10 and ds.in_channels == 1


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(D.DatasetError, match="apt-get install -y dataset-fashion-mnist"):
        D.load_dataset("fashion-mnist", str(tmp_path / "nowhere"))
    make_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(D.DatasetError, match="t10k-labels-idx1-ubyte"):
        D.load_dataset("fashion-mnist", str(tmp_path))


def test_corrupt_idx_is_reported(tmp_path):
    make_fashion_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(D.DatasetError, match="corrupt"):
        D.load_dataset("fashion-mnist", str(tmp_path))
    write_idx(tmp_path / "x.idx", np.zeros((4, 3), np.uint8), compress=False)
    raw = (tmp_path / "x.idx").read_bytes()
    (tmp_path / "x.idx").write_bytes(raw[:-2])
    with pytest.raises(D.DatasetError, match="truncated"):
        D.read_idx(str(tmp_path / "x.idx"))


def make_cifar(folder, classes, n=20, seed=0):
    rng = np.random.default_rng(seed)
    key = b"labels" if classes == 10 else b"fine_labels"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if classes == 10 else ["train", "test"]
    for name in names:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: list(rng.integers(0, classes, n))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


@pytest.mark.parametrize("classes,name,sub", [(10, "cifar10", "cifar-10-batches-py"),
                                              (100, "cifar100", "cifar-100-python")])
def test_cifar_pickle_reader(tmp_path, classes, name, sub):
    folder = tmp_path / sub
    folder.mkdir()
    make_cifar(folder, classes)
    ds = D.load_dataset(name, str(tmp_path))  # finds the standard sub-folder
    assert ds.train_x.shape == ((100 if classes == 10 else 20), 3, 32, 32)
    assert ds.num_classes == classes and ds.test_y.max() < classes
    raw = pickle.load(open(folder / ("test_batch" if classes == 10 else "test"), "rb"), encoding="bytes")
    assert torch.equal(ds.test_x[0], torch.from_numpy(raw[b"data"][0].reshape(3, 32, 32)))


def test_cifar_errors(tmp_path):
    with pytest.raises(D.DatasetError, match="--data-dir"):
        D.load_dataset("cifar10", None)
    with pytest.raises(D.DatasetError, match="not found"):
        D.load_dataset("cifar10", str(tmp_path))
    make_cifar(tmp_path, 10)
    (tmp_path / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(D.DatasetError, match="corrupt"):
        D.load_dataset("cifar10", str(tmp_path))
    with pytest.raises(D.DatasetError, match="unknown dataset"):
        D.load_dataset("imagenet-21k")


def test_augment_keeps_shape_and_content():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    out = D.augment(x, 2, gen)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert D.augment(x, 0, torch.Generator().manual_seed(1)).sum() == x.sum()  # flips only move pixels


def test_corrupt_idx_files_are_dataset_errors(tmp_path):
    """A header shorter than its dimension count, and a gzip file with a damaged stream (zlib.error), are
    DatasetErrors naming the file as corrupt, not struct/zlib tracebacks."""
    header = tmp_path / "h.idx"
    header.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">I", 5))  # says 3 dims, holds 1
    with pytest.raises(D.DatasetError, match="truncated"):
        D.read_idx(str(header))
    make_fashion_mnist(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    raw = bytearray(images.read_bytes())
    for i in range(20, 40):  # a valid gzip header, a damaged deflate stream
        raw[i] ^= 0xFF
    images.write_bytes(bytes(raw))
    with pytest.raises(D.DatasetError, match="corrupt"):
        D.read_idx(str(images))


def test_labels_out_of_range_empty_splits_and_mismatched_images_are_refused(tmp_path):
    """An out-of-range training label failed deep inside cross_entropy, an out-of-range test label counted as
    wrong (0% accuracy), an empty test split divided by zero, and test images of another size loaded."""
    make_fashion_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.full(64, 200))
    with pytest.raises(D.DatasetError, match="labels"):
        D.load_dataset("fashion-mnist", str(tmp_path))
    make_fashion_mnist(tmp_path, n_test=0)
    with pytest.raises(D.DatasetError, match="empty"):
        D.load_dataset("fashion-mnist", str(tmp_path))
    make_fashion_mnist(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((32, 32, 32)))
    with pytest.raises(D.DatasetError, match="disagree"):
        D.load_dataset("fashion-mnist", str(tmp_path))


def test_idx_file_longer_than_its_header_is_not_called_truncated(tmp_path):
    """Before: 'x.idx is truncated: header says (3,), found 5 values'."""
    (tmp_path / "x.idx").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 3) + bytes(5))
    with pytest.raises(D.DatasetError, match="holds more data than its header names") as e:
        D.read_idx(str(tmp_path / "x.idx"))
    assert "truncated" not in str(e.value) and "corrupt" in str(e.value)


def test_images_without_pixels_are_refused(tmp_path):
    """IDX headers of 0 x 0 images read as a dataset; building a model on it ended in an IndexError."""
    make_fashion_mnist(tmp_path)
    for prefix, n in (("train", 64), ("t10k", 32)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.zeros((n, 0, 0)))
    with pytest.raises(D.DatasetError, match="no pixels"):
        D.load_dataset("fashion-mnist", str(tmp_path))


def test_images_that_are_not_square_are_refused(tmp_path):
    """The in-memory datasets' images are square, and image_size (the models', the checkpoints') is one side:
    an mlp built for 28x20 files failed in its first layer with a width error naming neither the data nor a fix."""
    make_fashion_mnist(tmp_path)
    for prefix, n in (("train", 64), ("t10k", 32)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.zeros((n, 28, 20)))
    with pytest.raises(D.DatasetError, match="are 28x20, but this dataset's images are square"):
        D.load_dataset("fashion-mnist", str(tmp_path))


@pytest.mark.parametrize("batch", [{b"data": np.zeros((20, 3072), np.uint8), b"labels": [50] * 20},
                                   {b"data": np.zeros((20, 3072), np.uint8), b"labels": [-1] * 20},
                                   {b"data": np.full((20, 3072), 300), b"labels": [1] * 20},
                                   5, {b"data": np.zeros((20, 3072), np.uint8), b"labels": 5}],
                         ids=["label-50", "label-minus-1", "pixel-300", "not-a-dict", "labels-not-a-list"])
def test_malformed_cifar_batch_is_a_dataset_error(tmp_path, batch):
    """Labels outside the classes, pixels outside [0, 255] (they wrapped around), and batches of the wrong
    types (a TypeError before) are DatasetErrors."""
    make_cifar(tmp_path, 10)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(D.DatasetError):
        D.load_dataset("cifar10", str(tmp_path))


def test_atomic_write_gives_the_mode_open_would_and_leaves_nothing_on_error(tmp_path):
    """mkstemp's 0600 made every checkpoint, report and model readable by its owner only."""
    import stat

    from cadk.utils import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "r.json"), lambda f: f.write(b"{}"))
        assert stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode) == 0o644
    finally:
        os.umask(old)

    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(tmp_path / "x"), interrupted)
    assert os.listdir(tmp_path) == ["r.json"]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the umask from /proc (Linux)")
def test_atomic_write_reads_the_umask_without_changing_it(tmp_path, monkeypatch):
    """Setting the umask to read it changes it, for an instant, for every thread of the process."""
    import stat

    from cadk.utils import atomic_write

    old = os.umask(0o027)
    try:
        with monkeypatch.context() as m:
            m.setattr(os, "umask", lambda mask: pytest.fail("atomic_write set the process's umask"))
            atomic_write(str(tmp_path / "m"), lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "m").st_mode) == 0o640


def test_in_memory_training_batches_draw_as_before():
    """Dataset.train_batches draws the permutation, then each batch's crops, from the run's generator in the
    order the training loop did before it existed: runs on in-memory data give the same numbers."""
    x = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    ds = D.Dataset("t", x, torch.arange(10), x[:4], torch.arange(4), 10, (0.5,), (0.5,))
    gen, ref_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    got = list(ds.train_batches(0, 4, gen))
    ref = [(D.augment(xb, 2, ref_gen), yb) for xb, yb in D.batches(x, torch.arange(10), 4, True, ref_gen)]
    assert len(got) == len(ref) == 3
    for (a, ya), (b, yb) in zip(got, ref):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    assert torch.equal(gen.get_state(), ref_gen.get_state())
    assert torch.equal(next(ds.eval_batches(500))[0], x[:4]) and ds.num_train == 10


@pytest.mark.parametrize("augmented", [True, False])
def test_in_memory_batches_from_a_start_are_the_rest_of_the_epoch(augmented):
    """From the generator's state at the epoch's start, train_batches(start=k) gives batches k on of the epoch and
    leaves the generator where the whole epoch does (the skipped batches' crops are drawn, not made)."""
    x = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    ds = D.Dataset("t", x, torch.arange(10), x[:4], torch.arange(4), 10, (0.5,), (0.5,))
    gen, rest_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    whole = list(ds.train_batches(0, 4, gen, augmented))
    rest = list(ds.train_batches(0, 4, rest_gen, augmented, start=2))
    assert len(rest) == 1 and torch.equal(rest[0][0], whole[2][0]) and torch.equal(rest[0][1], whole[2][1])
    assert torch.equal(gen.get_state(), rest_gen.get_state())


# ---- image folders (ImageNet layouts) ----------------------------------------------------------------------
try:
    import PIL  # noqa: F401
    HAVE_PILLOW = True
except ImportError:
    HAVE_PILLOW = False
needs_pillow = pytest.mark.skipif(not HAVE_PILLOW, reason="Pillow is not installed (pip install pillow); CI installs it")
CLASSES = ["n02", "n01", "n10"]  # made in this order; their indices follow sorted order
SIZES = [(37, 23), (23, 37), (64, 9), (16, 16)]  # odd sizes, and one far wider than any allowed crop


def write_image(path, size, mode="RGB", seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8).squeeze(-1 if channels == 1 else ())
    Image.fromarray(pixels, mode).save(path)


def make_image_folder(root, val="folders", per_class=4):
    """3 classes x per_class training images (RGB, grayscale and CMYK JPEGs, a PNG with alpha) and 2 validation
    images per class, in class folders or flat with LOC_val_solution.csv (val="flat")."""
    rows = ["ImageId,PredictionString"]
    for c, name in enumerate(CLASSES):
        (root / "train" / name).mkdir(parents=True)
        for i in range(per_class):
            mode, ext = [("RGB", "JPEG"), ("L", "JPEG"), ("RGBA", "png"), ("CMYK", "JPEG")][i % 4]
            write_image(root / "train" / name / f"{name}_{i}.{ext}", SIZES[i % 4], mode, seed=10 * c + i)
        for i in range(2):
            image_id = f"ILSVRC2012_val_{2 * c + i:08d}"
            folder = root / "val" / (name if val == "folders" else "")
            folder.mkdir(parents=True, exist_ok=True)
            write_image(folder / f"{image_id}.JPEG", SIZES[i], seed=100 + 2 * c + i)
            rows.append(f"{image_id},{name} 1 2 10 12 {name} 3 4 5 6")
    if val == "flat":
        (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return root


@needs_pillow
@pytest.mark.parametrize("val", ["folders", "flat"])
def test_image_folder_labels_follow_sorted_class_folders(tmp_path, val):
    make_image_folder(tmp_path, val)
    (tmp_path / "train" / CLASSES[0] / "notes.txt").write_text("not an image")
    ds = D.load_dataset("imagefolder", str(tmp_path), image_size=16, workers=0)
    assert ds.classes == sorted(CLASSES) and ds.num_classes == 3 and ds.num_train == 12
    assert [ds.classes[label] for label in ds.train.labels] == [f.decode().split("/")[0] for f in ds.train.files]
    assert list(ds.train.labels) == [0] * 4 + [1] * 4 + [2] * 4
    # flat: val_0..5 are labelled n02, n02, n01, n01, n10, n10 by the csv
    assert list(ds.test.labels) == ([1, 1, 0, 0, 2, 2] if val == "flat" else [0, 0, 1, 1, 2, 2])
    x, y = next(ds.eval_batches(6))
    assert x.shape == (6, 3, 16, 16) and x.dtype == torch.uint8 and torch.equal(y, torch.from_numpy(ds.test.labels))


@needs_pillow
def test_kaggle_root_is_found(tmp_path):
    """The Kaggle archive unpacks to ILSVRC/Data/CLS-LOC/{train,val} beside LOC_val_solution.csv."""
    make_image_folder(tmp_path / "ILSVRC" / "Data" / "CLS-LOC", val="flat")
    (tmp_path / "ILSVRC" / "Data" / "CLS-LOC" / "LOC_val_solution.csv").rename(tmp_path / "LOC_val_solution.csv")
    ds = D.load_dataset("imagefolder", str(tmp_path), workers=0)
    assert len(ds.test.labels) == 6 and ds.test.labels.max() == 2


@needs_pillow
def test_crops_stay_inside_the_image_and_views_are_rgb_uint8(tmp_path):
    from cadk import images as I

    rng = np.random.default_rng(0)
    for w, h in [(37, 23), (23, 37), (500, 375), (1, 1), (3, 200)]:
        for _ in range(200):
            left, top, right, bottom = I.train_box(w, h, rng)
            assert 0 <= left < right <= w and 0 <= top < bottom <= h
        left, top, right, bottom = I.eval_box(w, h, 224)
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
        assert right - left == pytest.approx(min(w, h) * 224 / 256)
    # no crop of 8-100% of the area at aspect 3/4-4/3 fits 100x2: the centre crop at aspect 4/3
    assert I.train_box(100, 2, rng) == (48, 0, 51, 2)
    areas = [(r - l) * (b - t) / (500 * 375) for l, t, r, b in (I.train_box(500, 375, rng) for _ in range(500))]
    assert 0.07 < min(areas) and max(areas) <= 1 and np.mean(areas) < 0.7
    make_image_folder(tmp_path)
    ds = D.load_dataset("imagefolder", str(tmp_path), image_size=20, workers=0)
    for epoch in (0, None):  # training and evaluation views of RGB, grayscale, RGBA and CMYK images
        for i in range(4):
            x, label, error = I.Images(ds.train, 20, 0, epoch)[i]
            assert x.shape == (3, 20, 20) and x.dtype == torch.uint8 and x.is_contiguous() and error == ""
    gray = I.Images(ds.train, 20, 0)[1][0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


@needs_pillow
def test_batches_depend_on_seed_and_epoch_only(tmp_path):
    """The same (seed, epoch) gives the same batches with or without worker processes, and in a resumed run;
    another epoch gives another order and other crops."""
    make_image_folder(tmp_path)
    serial = D.load_dataset("imagefolder", str(tmp_path), image_size=16, workers=0, seed=5)
    parallel = D.load_dataset("imagefolder", str(tmp_path), image_size=16, workers=2, seed=5)
    epoch0 = list(serial.train_batches(0, 5, None))
    assert [len(y) for _, y in epoch0] == [5, 5, 2]
    for (a, ya), (b, yb) in zip(epoch0, parallel.train_batches(0, 5, None)):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    again = list(serial.train_batches(0, 5, None))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(epoch0, again))
    epoch1 = list(serial.train_batches(1, 5, None))
    assert not torch.equal(torch.cat([y for _, y in epoch0]), torch.cat([y for _, y in epoch1]))
    from cadk.images import Images

    views = [torch.stack([Images(serial.train, 16, 5, epoch)[i][0] for i in range(12)]) for epoch in (0, 1)]
    assert not torch.equal(views[0], views[1])  # other crops and flips
    order = np.random.default_rng([5, 0]).permutation(12)
    assert torch.equal(torch.cat([x for x, _ in epoch0]), views[0][order])
    plain = torch.cat([x for x, _ in serial.train_batches(0, 5, None, augmented=False)])
    assert torch.equal(plain, torch.stack([Images(serial.train, 16, 5)[i][0] for i in order]))  # evaluation views
    rest = list(serial.train_batches(0, 5, None, start=1))  # a run resumed after the epoch's first step
    assert [len(y) for _, y in rest] == [5, 2]
    assert all(torch.equal(a, b) and torch.equal(ya, yb) for (a, ya), (b, yb) in zip(rest, epoch0[1:]))


@needs_pillow
@pytest.mark.parametrize("damage,message", [
    ("no-data-dir", "--data-dir"),
    ("missing-folder", "is not a folder"),
    ("no-train", "train is missing"),
    ("flat-train", "holds no class folders"),
    ("empty-class", "holds no images"),
    ("val-class-not-in-train", "no counterpart in the train folder"),
    ("empty-val", "neither class folders nor images"),
    ("flat-val-without-csv", "LOC_val_solution.csv"),
    ("csv-not-imagenet", "ImageId,PredictionString"),
    ("csv-missing-a-row", "has no row for"),
    ("csv-class-not-in-train", "n99, which has no folder"),
    ("imagenet-with-3-classes", "1000 classes"),
])
def test_image_folder_errors_name_the_problem_and_the_fix(tmp_path, damage, message):
    make_image_folder(tmp_path, val="flat" if damage.startswith(("flat-val", "csv")) else "folders")
    data_dir, name = str(tmp_path), "imagefolder"
    csv = tmp_path / "LOC_val_solution.csv"
    if damage == "no-data-dir":
        data_dir = None
    elif damage == "missing-folder":
        data_dir = str(tmp_path / "nowhere")
    elif damage == "no-train":
        shutil.rmtree(tmp_path / "train")
    elif damage == "flat-train":
        shutil.rmtree(tmp_path / "train")
        (tmp_path / "train").mkdir()
        write_image(tmp_path / "train" / "a.JPEG", (8, 8))
    elif damage == "empty-class":
        (tmp_path / "train" / "n05").mkdir()
    elif damage == "val-class-not-in-train":
        (tmp_path / "val" / "n99").mkdir()
        write_image(tmp_path / "val" / "n99" / "a.JPEG", (8, 8))
    elif damage == "empty-val":
        shutil.rmtree(tmp_path / "val")
        (tmp_path / "val").mkdir()
    elif damage == "flat-val-without-csv":
        csv.unlink()
    elif damage == "csv-not-imagenet":
        csv.write_text("a,b\n1,2\n")
    elif damage == "csv-missing-a-row":
        csv.write_text("\n".join(csv.read_text().splitlines()[:-1]) + "\n")
    elif damage == "csv-class-not-in-train":
        csv.write_text(csv.read_text().replace("ILSVRC2012_val_00000000,n02", "ILSVRC2012_val_00000000,n99"))
    elif damage == "imagenet-with-3-classes":
        name = "imagenet"
    with pytest.raises(D.DatasetError, match=message) as info:
        D.load_dataset(name, data_dir, workers=0)
    if damage == "imagenet-with-3-classes":
        assert "--data imagefolder" in str(info.value)


def test_folder_datasets_without_pillow_say_how_to_install_it(tmp_path, monkeypatch):
    from cadk import images

    monkeypatch.setattr(images, "Image", None)
    with pytest.raises(D.DatasetError, match="pip install pillow"):
        D.load_dataset("imagenet", str(tmp_path))


@needs_pillow
@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_is_a_dataset_error_naming_the_file(tmp_path, workers):
    """Found when it is decoded, in a worker process or not: the error is the DatasetError's own message."""
    make_image_folder(tmp_path)
    bad = tmp_path / "train" / CLASSES[2] / "zz_broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (tmp_path / "train" / CLASSES[1] / "unreadable.JPEG").mkdir()  # not a file: skipped, like other non-images
    ds = D.load_dataset("imagefolder", str(tmp_path), image_size=16, workers=workers)
    assert ds.num_train == 13
    with pytest.raises(D.DatasetError) as info:
        for _ in ds.train_batches(0, 4, None):
            pass
    text = str(info.value)
    assert str(bad) in text and "replace or delete it" in text
    assert "Traceback" not in text and "DataLoader worker" not in text


class _DyingImages:
    """A split whose decoding kills its worker process, as the out-of-memory killer does."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


@needs_pillow
def test_worker_killed_mid_epoch_is_a_dataset_error_saying_what_to_change(tmp_path, monkeypatch):
    from cadk import images

    make_image_folder(tmp_path)
    ds = D.load_dataset("imagefolder", str(tmp_path), image_size=16, workers=1)
    monkeypatch.setattr(images, "Images", lambda *args, **kw: _DyingImages(range(ds.num_train)))
    with pytest.raises(D.DatasetError, match="worker process died.*fewer --workers"):
        for _ in ds.train_batches(0, 4, None):
            pass


@needs_pillow
def test_images_in_subfolders_of_a_class_folder_belong_to_that_class(tmp_path):
    """torchvision's ImageFolder reads a class folder's subfolders too; they were ignored (a class holding only
    subfolders was refused as empty). Hidden and linked subfolders are not entered (a link can loop)."""
    make_image_folder(tmp_path)
    nested = tmp_path / "train" / CLASSES[1] / "batch2" / "more"
    nested.mkdir(parents=True)
    write_image(nested / "deep.JPEG", SIZES[0], seed=7)
    (tmp_path / "train" / CLASSES[1] / ".cache").mkdir()
    write_image(tmp_path / "train" / CLASSES[1] / ".cache" / "thumb.JPEG", SIZES[0], seed=8)
    (tmp_path / "train" / CLASSES[1] / "loop").symlink_to(tmp_path / "train" / CLASSES[1])
    ds = D.load_dataset("imagefolder", str(tmp_path), image_size=16, workers=0)
    assert ds.num_train == 13
    i = [f.decode() for f in ds.train.files].index(f"{CLASSES[1]}/batch2/more/deep.JPEG")
    assert ds.classes[ds.train.labels[i]] == CLASSES[1]
    x, _ = next(ds.train_batches(0, 13, None))
    assert x.shape == (13, 3, 16, 16)


@needs_pillow
@pytest.mark.parametrize("val", ["folders", "flat"])
def test_hidden_files_beside_the_images_are_no_images(tmp_path, val):
    """A copy made on macOS leaves an AppleDouble '._<name>' beside every image (on exFAT and network drives):
    they were read as images, which stopped training at the first one with 'not an image', and in a flat val
    folder gave 'the csv belongs to another release'."""
    make_image_folder(tmp_path, val)
    apple_double = b"\x00\x05\x16\x07" + bytes(60)
    (tmp_path / "train" / CLASSES[0] / f"._{CLASSES[0]}_0.JPEG").write_bytes(apple_double)
    (tmp_path / "val" / (CLASSES[0] if val == "folders" else "") / "._ILSVRC2012_val_00000000.JPEG").write_bytes(
        apple_double)
    ds = D.load_dataset("imagefolder", str(tmp_path), image_size=16, workers=0)
    assert ds.num_train == 12 and len(ds.test.labels) == 6
    assert sum(len(y) for _, y in ds.train_batches(0, 5, None)) == 12


@needs_pillow
def test_solution_csv_saved_with_a_byte_order_mark_is_read(tmp_path):
    """A LOC_val_solution.csv saved again by a spreadsheet (UTF-8 with BOM, CRLF lines) was refused as 'not
    ImageNet's LOC_val_solution.csv': the BOM stuck to 'ImageId'."""
    make_image_folder(tmp_path, val="flat")
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_bytes(b"\xef\xbb\xbf" + csv.read_text().replace("\n", "\r\n").encode())
    ds = D.load_dataset("imagefolder", str(tmp_path), workers=0)
    assert list(ds.test.labels) == [1, 1, 0, 0, 2, 2]


@needs_pillow
def test_16_bit_grayscale_image_is_scaled_not_clipped(tmp_path):
    """Pillow's convert('RGB') clips 16-bit values at 255: a 16-bit grayscale PNG (scans, microscopy, depth)
    came out all white but for its darkest 0.4%, and training went on without a word."""
    from PIL import Image

    from cadk.images import decode

    deep = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    Image.fromarray((deep >> 8).astype(np.uint8)).save(tmp_path / "shallow.png")
    got, expected = (np.asarray(decode(str(tmp_path / n))).astype(int) for n in ("deep.png", "shallow.png"))
    assert got.shape == (64, 64, 3) and np.abs(got - expected).max() <= 1
