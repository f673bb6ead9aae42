"""Where a command will write, checked before its work starts (a profile, a search, ranks).

A folder a command creates or fills may not have a file anywhere on its path, and the nearest
folder that exists must take a new file; a file it writes may not be a folder, and its folder
must exist and take a new file. Writability is probed by creating (and removing) a temporary
file, which also holds for root and for read-only mounts, where permission bits say nothing.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mimo_builder._internal.errors import ConfigError


def check_folder(path: str | os.PathLike, flag: str) -> None:
    """ConfigError naming ``flag`` unless ``path`` can be a folder this process writes into."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            what = "is a file" if part == path else f"lies under {part}, which is a file"
            raise ConfigError(f"{flag} {path}: {what}; give a folder")
    existing = next(p for p in (path, *path.parents, Path(".")) if p.is_dir())
    _probe(existing, path, flag)


def check_file(path: str | os.PathLike, flag: str) -> None:
    """ConfigError naming ``flag`` unless ``path`` can be written as a file (created or replaced)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; give a file name")
    folder = path.parent
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is a file"
        raise ConfigError(f"{flag} {path}: its folder {folder} {what}; create the folder or write elsewhere")
    _probe(folder, path, flag)


def _probe(folder: Path, path: Path, flag: str) -> None:
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ConfigError(f"{flag} {path}: cannot write in {folder} ({err.strerror or err}); "
                          "give a path this user may write") from None
