"""Small shared helpers."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Callable, IO


PARTIAL_PREFIX = ".tmp-"  # the temporary files of atomic_write


@contextlib.contextmanager
def eval_mode(model):
    """model.eval() within the block, then every module's own mode back: model.train(was_training) set them
    all alike, which un-froze a BN put in eval mode on its own (bn.eval()) in a training model."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write through a temporary file in the same folder, fsync, then rename: a crash never leaves a
    half-written file at `path` (a killed process leaves the temporary one: remove_partial_writes)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=PARTIAL_PREFIX, dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would have given it
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    """The process's umask. Linux reports it in /proc; elsewhere it can only be read by setting it, which
    for an instant changes it for every thread of the process."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o077)  # the safer value for the instant it is set
    os.umask(umask)
    return umask


def remove_partial_writes(folder: str) -> None:
    """Delete the temporary files that atomic_writes killed mid-way (SIGKILL, power loss) left in `folder`:
    nothing else removes them, and each can be as large as a checkpoint."""
    for name in os.listdir(folder):
        if name.startswith(PARTIAL_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))


def atomic_write_json(path: str, obj) -> None:
    """obj as indented JSON at path, written atomically (atomic_write)."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the system.

    By default glibc returns large freed blocks to the system (heap trimming, mmap), so the
    activation-sized tensors of a CPU training step come back as fresh pages and page-fault on first
    touch, step after step. On a conv layer that was a third of its step time here, and how much
    depends on the process's heap layout, so timings swing from one run to the next. This serves
    blocks up to 32 MiB (glibc's limit on 64-bit systems) from the heap (M_MMAP_THRESHOLD) and raises
    the trim threshold to 2 GiB (M_TRIM_THRESHOLD), for the whole process: its memory stays near the
    peak of a step. The MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ environment variables, or
    jemalloc/tcmalloc, do the same from outside. Returns False where malloc is not glibc's (or
    another allocator is preloaded) or glibc refuses a setting.
    """
    import ctypes

    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt, _ = libc.mallopt, libc.gnu_get_libc_version
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
