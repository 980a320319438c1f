"""Durable file writes shared by checkpoint saving and the disk Engram tables."""
from __future__ import annotations

import os


def fsync_path(path: str) -> None:
    """fsync a file, or a folder (which makes the renames and deletions in it durable). A folder that this platform
    cannot open or sync is skipped; a file that cannot be synced is an error."""
    is_dir = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:
            raise
    finally:
        os.close(fd)
