"""Atomic file writes: a reader (or a crash) never sees a half-written file."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give it the mode a plain open() would (0666 - umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    _atomic(Path(path), lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` that leaves either the old file or the complete new one, never a torn one."""
    _atomic(Path(path), lambda f: torch.save(obj, f))


def replace_dir(staged: str | Path, final: str | Path) -> None:
    """Move a fully written folder into place, replacing any previous one.

    The old folder is renamed aside first and removed only after the new one is in place,
    so at every instant one complete version exists on disk.
    """
    staged, final = Path(staged), Path(final)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def removed_on_error(folder: str | Path):
    """Delete ``folder`` if the block fails and the folder did not exist before it.

    Setting up a run creates the output folder (torchtune's checkpointers and metric loggers
    make it); a run that fails during set-up should leave no trace, as a bad config would.
    """
    folder = Path(folder)
    existed = folder.exists()
    try:
        yield
    except BaseException:
        if not existed and folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        raise


# Output folders this process holds, so one process can run several recipes on one folder
# (a test, a crash and its resume) while another process is refused.
_HELD_LOCKS: dict = {}


def lock_output_dir(folder: str | Path) -> None:
    """Claim ``folder`` for this process, or refuse naming the process that holds it.

    An advisory ``flock`` on ``<folder>/.lorasc.lock``: the kernel drops it when its process
    dies, however it dies, so a lock left by a killed run never blocks the next one.

    Raises:
        RuntimeError: another live process holds the folder.
    """
    import fcntl

    folder = Path(folder).resolve()
    if folder in _HELD_LOCKS:
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lorasc.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RuntimeError(
            f"output_dir {folder} is in use by another LoRASC run (process {holder}); wait for "
            f"it to finish or stop it, or choose another output_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD_LOCKS[folder] = fd


@contextlib.contextmanager
def write_failure_explained(what: str, kept: str):
    """Turn a failed write into one plain error: what failed, why (a full disk is named as
    such; torch reports it as ``enforce fail at inline_container.cc``) and what is intact."""
    import errno

    try:
        yield
    except Exception as err:  # noqa: BLE001 - safetensors raises its own class for ENOSPC
        full = (getattr(err, "errno", None) == errno.ENOSPC or "inline_container" in str(err)
                or "No space left" in str(err))
        if not full:
            raise
        raise OSError(errno.ENOSPC, f"{what} failed: no space left on the device; {kept}. Free "
                                    f"some space and resume with resume_from_checkpoint: true") \
            from err
