"""Dataset readers on small files in the standard formats, and their errors."""
import gzip
import os
import pickle
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
