"""User-facing errors and the BIDS-App exit codes they map to.

Every mistake a user can make (a bad path, a corrupt file, an option that makes no sense)
is raised as a :class:`Spec2VolError` carrying one line of text and an exit code; the command
line prints that line and exits with the code, without a traceback.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

EX_OK = 0
EX_FAILURE = 1
EX_VALIDATION = 16  # bids-validator found errors
EX_NOSELECTION = 18  # participant/session/task filters selected nothing
EX_USAGE = 64  # command-line usage error
EX_DATAERR = 65  # input data are malformed or inconsistent
EX_NOINPUT = 66  # an input file is missing or unreadable
EX_CANTCREAT = 73  # the output cannot be created
EX_IOERR = 74  # an input/output error while writing (e.g. the disk is full)
EX_INTERRUPTED = 130  # SIGINT


class Spec2VolError(Exception):
    """A problem the user can fix; ``str(error)`` is the one-line message to show.

    Parameters
    ----------
    message : str
        What is wrong and, where possible, what to do about it.
    code : int
        The exit code (one of the ``EX_*`` constants of this module).
    path : str | Path | None
        The file or directory at fault; it is prefixed to the message.

    Attributes
    ----------
    reason : str
        The message without the path, to raise again naming another file.
    """

    code = EX_FAILURE

    def __init__(self, message: str, *, code: int | None = None, path: str | Path | None = None):
        self.reason = " ".join(str(message).split())  # the message without the path
        if path is not None:
            message = f"{path}: {message}"
        super().__init__(" ".join(str(message).split()))
        if code is not None:
            self.code = code
        self.path = None if path is None else str(path)


class UsageError(Spec2VolError):
    code = EX_USAGE


class ValidationError(Spec2VolError):
    code = EX_VALIDATION


class NothingSelectedError(Spec2VolError):
    code = EX_NOSELECTION


class DataError(Spec2VolError):
    code = EX_DATAERR


class MissingInputError(Spec2VolError):
    code = EX_NOINPUT


class OutputError(Spec2VolError):
    code = EX_CANTCREAT


def output_error(exc: OSError, what: str, path) -> OutputError:
    """A failed write as the user's error: exit 74 when the disk or quota is full (or a file
    size limit reached), 73 when the output cannot be created at all."""
    full = exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    return OutputError(f"cannot write {what} ({exc.strerror or exc})", path=path,
                       code=EX_IOERR if full else EX_CANTCREAT)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(error: BaseException | str, limit: int = 200) -> str:
    """A library's error text fit for a one-line message: terminal colour codes removed,
    whitespace collapsed, cut at a word boundary (with "...") when longer than ``limit``."""
    text = error if isinstance(error, str) else (str(error) or type(error).__name__)
    text = " ".join(_ANSI.sub("", text).split())
    if len(text) <= limit:
        return text
    cut = text[:limit - 3].rsplit(" ", 1)[0]
    return cut + "..."
