"""Writing files so that a crash never leaves half of one, and reading checkpoints safely."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import ReidError


def umask_mode() -> int:
    """The mode a plain new file gets here (0o666 less the umask): mkstemp's 0600 would hide outputs from the group."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, flush it to disk, then rename it over `path` in one step:
    a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path: str | Path, df) -> Path:
    return atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def save_checkpoint(path: str | Path, state: dict) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """Tensors and plain containers only: a checkpoint from elsewhere cannot run code when loaded. `mmap`: tensors
    are mapped, not read (a few fields of a large checkpoint)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ReidError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises several types for a bad or hostile file
        raise ReidError(f"{path} is not a loadable reid checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]})") from err
