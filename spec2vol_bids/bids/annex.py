"""Input files that are present in name only: git-annex / DataLad pointers.

OpenNeuro datasets are distributed as DataLad (git-annex) repositories: a clone holds, for
every large file, either a symbolic link into ``.git/annex/objects`` that dangles until the
content is fetched, or (for "unlocked" files) a small text file naming the annex object. Read
as data, such a pointer is "not found" or a header with no content; :func:`require_content`
says what it is and how to get the data instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from spec2vol_bids.errors import MissingInputError

_POINTER_PREFIX = b"/annex/objects/"
_FETCH_HINT = "fetch it first (datalad get FILE, or git annex get FILE)"


def require_content(path: str | Path, what: str) -> None:
    """Raise :class:`MissingInputError` (66) unless ``path`` is a file with real content."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        target = os.readlink(path)
        if "annex/objects" in target:
            raise MissingInputError(f"{what} is a git-annex link whose content is not here; "
                                    f"{_FETCH_HINT}", path=path)
    if not path.is_file():
        raise MissingInputError(f"{what} not found", path=path)
    if path.stat().st_size < 1024:
        with open(path, "rb") as fh:
            if fh.read(len(_POINTER_PREFIX)) == _POINTER_PREFIX:
                raise MissingInputError(f"{what} is a git-annex pointer file, not the data; "
                                        f"{_FETCH_HINT}", path=path)
