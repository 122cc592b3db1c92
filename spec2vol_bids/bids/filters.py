"""fMRIPrep-style ``--bids-filter-file``: entity queries for the EEG and BOLD files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from spec2vol_bids.errors import MissingInputError, UsageError, one_line
from spec2vol_bids.naming import ENTITY_NAMES

#: The queries spec2vol uses.
QUERIES = ("eeg", "bold")
#: Query names of fMRIPrep/sMRIPrep filter files that do not concern spec2vol: a filter file
#: written for fMRIPrep is accepted and these parts are ignored (with a note).
FOREIGN_QUERIES = frozenset({"t1w", "t2w", "flair", "roi", "fmap", "sbref", "dwi", "pet", "asl",
                             "t2star", "mt", "pd", "pdw"})
_KNOWN = ENTITY_NAMES | {"extension", "suffix", "datatype", "split"}


def load_bids_filters(path: str | Path) -> dict[str, dict]:
    """Read a ``--bids-filter-file`` in fMRIPrep's format.

    The file maps a query name to entity filters, e.g.
    ``{"eeg": {"session": "1"}, "bold": {"run": [1, 2], "acquisition": null}}``. A value may be
    a string, a number, a list of them (any matches), ``null`` (the entity must be absent) or
    ``"*"`` (it must be present). spec2vol uses the ``eeg`` and ``bold`` queries; fMRIPrep's
    other queries (``t1w``, ``fmap``, ...) are accepted so that one filter file can serve both
    tools, and ignored.

    Raises
    ------
    MissingInputError (66)
        The file does not exist or cannot be read.
    UsageError (64)
        The file is not valid JSON, or names an unknown query or entity.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise MissingInputError("BIDS filter file not found", path=path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise MissingInputError(f"cannot read the BIDS filter file ({one_line(exc)})",
                                path=path) from exc
    try:
        filters = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"the BIDS filter file is not valid JSON ({exc})", path=path) from exc
    check_filters(filters, path)
    return filters


def check_filters(filters, source) -> None:
    """Refuse (64) filters that are not ``{query: {entity: value(s)}}`` with known names."""
    if not isinstance(filters, dict):
        raise UsageError('a BIDS filter file holds a JSON object such as {"bold": {"run": 1}}',
                         path=source)
    for query, spec in filters.items():
        if query not in QUERIES and query not in FOREIGN_QUERIES:
            raise UsageError(f"unknown query {query!r} in the BIDS filter file; spec2vol uses "
                             f"{' and '.join(QUERIES)}", path=source)
        if not isinstance(spec, dict):
            raise UsageError(f"the {query!r} query must be a JSON object of entity filters",
                             path=source)
        for entity, value in spec.items():
            if entity not in _KNOWN:
                raise UsageError(f"unknown entity {entity!r} in the {query!r} query of the BIDS "
                                 "filter file (use pybids names: session, run, acquisition, ...)",
                                 path=source)
            values = value if isinstance(value, list) else [value]
            if not all(v is None or isinstance(v, (str, int)) for v in values):
                raise UsageError(f"the {query!r} filter on {entity!r} must be a string, a number, "
                                 "null or a list of them", path=source)


def matches(entities: Mapping, query: Mapping) -> bool:
    """Whether a file's entities satisfy one fMRIPrep-style query."""
    for name, wanted in query.items():
        have = entities.get(name)
        options = wanted if isinstance(wanted, list) else [wanted]
        if not any(same_value(name, have, want) for want in options):
            return False
    return True


def same_value(name: str, have, want) -> bool:
    """Whether an entity value satisfies a filter value (``None``: absent, ``"*"``: present;
    ``run 1`` selects ``run-01``)."""
    if want is None:
        return have is None
    if have is None:
        return False
    if want == "*":
        return True
    if name == "extension":
        return str(have).lstrip(".") == str(want).lstrip(".")
    have, want = str(have), str(want)
    if have.isdigit() and want.isdigit():  # run 1 selects run-01
        return int(have) == int(want)
    return have == want
