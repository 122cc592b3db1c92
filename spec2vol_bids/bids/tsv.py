"""Read BIDS TSV sidecars (channels.tsv, events.tsv) as public datasets actually write them.

BIDS asks for UTF-8, tab-separated files with unquoted values. Real datasets deviate, and a
user with a read-only copy of a public dataset cannot fix them:

* Lioi et al. XP1/XP2 (OpenNeuro ds002336, ds002338) separate channels.tsv columns with three
  spaces and quote every name, the ECG one with a typographic closing quote (``'ECG’``);
* files carry a byte-order mark, CRLF or mixed line endings, no final newline, ragged rows;
* a file written on Windows may be latin-1 (cp1252) rather than UTF-8.

:func:`read_tsv` reads all of these; every deviation from the standard is logged as a warning
naming the file, so a user learns what was assumed. What it cannot make sense of raises
:class:`~spec2vol_bids.errors.DataError`; callers that can fall back on what the EEG file says
(its own channel names and types, its own markers) catch it and log why.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from spec2vol_bids.errors import DataError, MissingInputError

logger = logging.getLogger(__name__)

# Quotes a value may be wrapped in: ASCII single/double and the typographic pairs, which word
# processors substitute and which do not always pair up (the XP1 ECG row opens with ' and
# closes with ’).
_QUOTES = "'\"\u2018\u2019\u201a\u201b\u201c\u201d\u201e\u201f"
_QUOTED = re.compile(rf"^[{_QUOTES}](.*)[{_QUOTES}]$", re.S)
_WORDS = re.compile(r'"[^"]*"|\S+')


def read_tsv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a BIDS TSV file, as dicts keyed by the lower-cased column names.

    Parameters
    ----------
    path : str | Path
        The file.

    Returns
    -------
    rows : list of dict
        One dict per non-blank data row, values stripped of surrounding whitespace and quotes.
        Missing trailing values are ``""``.

    Raises
    ------
    MissingInputError
        The file cannot be read.
    DataError
        The file has no header line, or its rows cannot be split into the header's columns.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise MissingInputError(f"cannot read the file ({exc.strerror})", path=path) from exc
    text = _decode(raw, path)
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError("the file is empty: a TSV sidecar needs a header line", path=path)
    tabbed = "\t" in lines[0]
    if not tabbed:
        logger.warning("%s: not tab-separated; columns split at whitespace", path)
    header = [_unquote(name).lower() for name in _split(lines[0], tabbed)]
    rows, quoted, ragged = [], False, 0
    for line in lines[1:]:
        cells = _split(line, tabbed)
        if len(cells) > len(header) and any(c.strip() for c in cells[len(header):]):
            raise DataError(f"a row has {len(cells)} values for {len(header)} columns: "
                            f"{line.strip()[:60]!r}", path=path)
        ragged += len(cells) != len(header)
        values = []
        for cell in cells[:len(header)]:
            value = _unquote(cell)
            quoted |= value != cell.strip()
            values.append(value)
        values += [""] * (len(header) - len(values))
        rows.append(dict(zip(header, values)))
    if quoted:
        logger.warning("%s: values are quoted; the quotes were removed", path)
    if ragged:
        logger.warning("%s: %d row(s) have a number of values other than the header's", path, ragged)
    return rows


def _decode(raw: bytes, path: Path) -> str:
    if raw.startswith(b"\xef\xbb\xbf"):
        logger.warning("%s: starts with a byte-order mark; ignored", path)
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        logger.warning("%s: not UTF-8; read as Windows-1252/latin-1", path)
        try:
            return raw.decode("cp1252")
        except UnicodeDecodeError:
            return raw.decode("latin-1")


def _split(line: str, tabbed: bool) -> list[str]:
    if tabbed:
        return line.rstrip("\r\n").split("\t")
    # a double-quoted value may hold spaces; single quotes double as apostrophes and as the
    # unpaired typographic quotes above, so they do not group words
    return _WORDS.findall(line)


def _unquote(value: str) -> str:
    value = value.strip()
    match = _QUOTED.match(value)
    return match.group(1).strip() if match and len(value) >= 2 else value
