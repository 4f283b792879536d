"""Progress bars and log lines that do not trample each other: log records go through tqdm's writer, and bars
drawn into a file (no terminal) are switched off, where each redraw would be one more `\\r` line."""

from __future__ import annotations

import logging
import sys


class TqdmHandler(logging.StreamHandler):
    """A console handler that prints above the progress bars instead of across them."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(level: int) -> None:
    root = logging.getLogger()
    root.setLevel(level)
    for h in [h for h in root.handlers if isinstance(h, TqdmHandler)]:
        root.removeHandler(h)
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root.addHandler(handler)


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar on a terminal; none when stderr is a file or a pipe (the log keeps the per-epoch lines), nor in
    torchrun's processes but the first."""
    from tqdm import tqdm

    from .distributed import is_main

    disable = kwargs.pop("disable", None) if is_main() else True
    return tqdm(iterable, disable=disable, **kwargs)
