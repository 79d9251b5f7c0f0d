"""Files: atomic writes (temporary name + rename), safe loading, device and thread choice, helper processes."""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import sys
import tempfile
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

from ld3.errors import UserError

log = logging.getLogger("ld3")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; written files are ordinary files
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # name the file (a full disk says nothing else)
            raise type(e)(e.errno, e.strerror, str(path)) from e
        raise


LOCK_NAME = ".ld3.lock"


class FolderLock:
    """An exclusive lock on a folder while this process writes it (``with FolderLock(folder, "run folder"):``).

    ``flock`` on ``folder/.ld3.lock``, which holds the writer's process id; a second writer stops with
    one line naming it. The kernel drops the lock when the process ends, killed or not. Where ``fcntl``
    is missing (Windows) there is no lock."""

    def __init__(self, folder: Path, what: str):
        self.folder, self.what, self._f = Path(folder), what, None

    def __enter__(self) -> "FolderLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        f = open(self.folder / LOCK_NAME, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "unknown"
            f.close()
            raise UserError(f"{self.what} {self.folder} is being written by another process (pid {pid}); wait "
                            "for it to finish, or use another folder") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._f = f
        return self

    def __exit__(self, *exc) -> None:
        if self._f is not None:
            import fcntl

            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None


def remove_stale_temporaries(folder: Path) -> int:
    """Delete temporary files left by a killed writer (``.name.XXXX.tmp``); returns how many."""
    n = 0
    for p in Path(folder).glob(".*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic_write_bytes(path, buf.getvalue())


def atomic_save_figure(fig, path: Path, **kw) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **kw)
    _atomic_write_bytes(path, buf.getvalue())


def safe_load(path: Path, what: str = "file") -> Any:
    """torch.load with weights_only=True (no code runs); a bad file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"{what} {path} is not a valid torch file ({type(e).__name__}); regenerate it") from None


def pick_device(name: str | None) -> torch.device:
    """cuda when available (respecting CUDA_VISIBLE_DEVICES), else cpu; ``name`` overrides."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name} requested but CUDA is not available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {name} does not exist ({torch.cuda.device_count()} visible); "
                            "pick another index or --device cpu")
    elif dev.type not in ("cpu", "mps"):
        raise UserError(f"unsupported device {name!r}; use cpu or cuda")
    return dev


def set_threads(threads: int | None, small_model: bool) -> int:
    """Choose torch CPU threads. Small networks are faster on one thread (measured on 2 cores)."""
    if threads is None:
        threads = 1 if small_model else max(1, os.cpu_count() or 1)
    torch.set_num_threads(max(1, int(threads)))
    return torch.get_num_threads()


def die_with_parent() -> None:
    """In a helper process: be killed when the parent dies (else a SIGKILLed run leaves it behind)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _start_helper(initializer: Callable[[], None] | None) -> None:
    die_with_parent()
    torch.set_num_threads(1)  # a forked OpenMP pool is not safe to use; helpers need no threads
    if initializer is not None:
        initializer()


def background_executor(device: torch.device, initializer: Callable[[], None] | None = None,
                        processes: int = 1) -> Executor:
    """Helpers for work that should overlap the main loop (writing files, drawing figures).

    On a Linux CPU run ``processes`` forked processes: the main loop and a helper would otherwise
    share one interpreter lock. With an accelerator (whose state must not be forked) or elsewhere
    one thread: the main thread then mostly waits on the device. ``initializer`` runs first in
    each helper.
    """
    if device.type == "cpu" and sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods():
        return ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_start_helper, initargs=(initializer,))
    return ThreadPoolExecutor(max_workers=1, initializer=initializer)
