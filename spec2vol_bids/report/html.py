"""The HTML machinery of the reports: escaping, tables, embedded figures and the page itself.

A page is one file that opens offline: figures are ``data:`` URIs and the stylesheet
(``style.css``, package data) is inlined, so it can be mailed or archived as it is.
"""

from __future__ import annotations

import base64
import datetime as dt
import html as _html
from importlib.resources import files
from pathlib import Path

import numpy as np

from spec2vol_bids import __version__

#: The reports' stylesheet, inlined in every page.
STYLE = files("spec2vol_bids.report").joinpath("style.css").read_text(encoding="utf-8")


def escape(text) -> str:
    """``text`` (any value, as ``str``) safe inside HTML text and quoted attributes."""
    return _html.escape(str(text), quote=True)


def empty(message: str) -> str:
    """A section's body that says what has no data yet, and how to make it."""
    return f'<p class="empty">{escape(message)}</p>'


def fmt(value, digits: int) -> str:
    """A number with ``digits`` decimals for a table cell, ``n/a`` when missing or not finite."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if not np.isfinite(value) else f"{value:.{digits}f}"


def _data_uri(payload: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(payload).decode("ascii")


def png_uri(png: bytes) -> str:
    """A PNG image as a ``data:`` URI."""
    return _data_uri(png, "image/png")


def svg_file_uri(path: Path) -> str:
    """An SVG file as a ``data:`` URI."""
    return _data_uri(path.read_bytes(), "image/svg+xml")


def figure(uri: str, caption: str, alt: str) -> str:
    """An embedded image with its caption."""
    return (f'<figure><img src="{uri}" alt="{escape(alt)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def table(header: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    """A table of escaped cells; the columns in ``numeric`` are right-aligned."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(
            f'<td class="num">{escape(v)}</td>' if i in numeric else f"<td>{escape(v)}</td>"
            for i, v in enumerate(row)) + "</tr>"
        for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, sections: list[tuple[str, str, str]]) -> str:
    """A whole HTML document from (anchor, heading, body html) sections."""
    nav = "".join(f'<a href="#{a}">{escape(h)}</a>' for a, h, _ in sections)
    body = "".join(f'<section id="{a}"><h2>{escape(h)}</h2>{b}</section>' for a, h, b in sections)
    stamp = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{escape(title)}</title><style>\n{STYLE}</style></head><body>"
        f"<nav>{nav}</nav><main><h1>{escape(title)}</h1>"
        f'<p class="small">spec2vol {escape(__version__)} &middot; '
        f"report written {escape(stamp)}</p>"
        f"{body}</main></body></html>\n"
    )
