"""Self-contained HTML pages: :func:`render_html` turns a title and a list of :class:`Section`
(markdown-ish paragraphs, :class:`Table`, :class:`Figure` and collapsible :class:`Details`) into
one HTML page with every figure embedded (base64 PNG or SVG), so the file can be mailed or
archived. The run, sweep and demo reports are built with it; so can any other page, e.g.::

    write_html(out / "report.html", "My results", [
        Section("Scores", ["Test split, **8 classes**; see `runs/x`."], [Table(["method", "accuracy"], rows)]),
        Section("Curves", [Figure(out / "plots" / "curves.svg", "Loss and accuracy per epoch")]),
    ])
"""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

from ..core.files import atomic_write_text

@dataclass
class Table:
    """A table; cells are shown as given (format numbers before), the first ``label_columns``
    columns left-aligned, the others right-aligned."""

    header: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""
    label_columns: int = 1


@dataclass
class Figure:
    """An image file (PNG or SVG) embedded in the page, with a caption (markdown-ish)."""

    path: Path
    caption: str = ""


@dataclass
class Details:
    """Preformatted text (a config, a log) folded under a summary line until clicked."""

    summary: str
    text: str


Block = Union[str, Table, Figure, Details]  # a str is a markdown-ish paragraph


@dataclass
class Section:
    """A titled part of a page: its blocks in order."""

    title: str
    blocks: Sequence[Block] = field(default_factory=list)


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1000px;margin:2em auto;
     padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
.subtitle{color:#666;margin-top:0} nav{font-size:.92em;color:#444} nav a{margin-right:.9em;white-space:nowrap}
table{border-collapse:collapse;margin:.3em auto .8em;font-size:.85em} .caption{color:#555;font-size:.92em;margin:.6em 0 0}
th,td{border:1px solid #d5d5d5;padding:3px 7px;text-align:right;font-variant-numeric:tabular-nums}
td{white-space:nowrap}
.wide{overflow-x:auto;width:min(calc(100vw - 2em),1500px);margin-left:50%;transform:translateX(-50%)}
th{background:#f2f2f2} td.l,th.l{text-align:left} tr:nth-child(even) td{background:#fafafa}
figure{margin:1em 0} figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.92em} code{background:#f3f3f3;padding:0 .25em;border-radius:3px}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em} summary{cursor:pointer;color:#0a58ca}
"""


def _inline(text: str) -> str:
    """Markdown-ish inline markup, HTML-escaped: `code`, **bold**, *italic*, [text](link)."""
    out = []
    for i, part in enumerate(text.split("`")):
        part = html.escape(part)
        if i % 2:
            out.append(f"<code>{part}</code>")
            continue
        part = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", part)
        part = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", part)
        part = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', part)
        out.append(part)
    return "".join(out)


def _paragraph(text: str) -> str:
    """A paragraph, or a bullet list when every line starts with "- "."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if lines and all(line.startswith("- ") for line in lines):
        return "<ul>" + "".join(f"<li>{_inline(line[2:])}</li>" for line in lines) + "</ul>"
    return f"<p>{_inline(' '.join(lines))}</p>"


def _table(table: Table) -> str:
    def cells(row: Sequence[Any], tag: str) -> str:
        return "".join(f"<{tag}{' class=l' if i < table.label_columns else ''}>{_inline(str(c))}</{tag}>"
                       for i, c in enumerate(row))

    # a paragraph, not <caption>: a caption wraps to the table's width, which is narrow for small tables
    caption = f'<p class="caption">{_inline(table.caption)}</p>' if table.caption else ""
    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in table.rows)
    return (f"{caption}<div class=wide><table><thead><tr>{cells(table.header, 'th')}</tr></thead><tbody>{body}"
            "</tbody></table></div>")


def _figure(figure: Figure) -> str:
    path = Path(figure.path)
    if not path.is_file():
        return ""
    kind = "svg+xml" if path.suffix.lower() == ".svg" else "png"
    data = base64.b64encode(path.read_bytes()).decode()
    caption = f"<figcaption>{_inline(figure.caption)}</figcaption>" if figure.caption else ""
    alt = html.escape(figure.caption or path.stem, quote=True)
    return f'<figure><img alt="{alt}" src="data:image/{kind};base64,{data}">{caption}</figure>'


def _block(block: Block) -> str:
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Figure):
        return _figure(block)
    if isinstance(block, Details):
        return f"<details><summary>{_inline(block.summary)}</summary><pre>{html.escape(block.text)}</pre></details>"
    return _paragraph(block)


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def render_html(title: str, sections: Sequence[Section], subtitle: str = "") -> str:
    """One self-contained HTML page: a title, an optional subtitle (markdown-ish), a table of
    contents and the sections in order. Figures are embedded, so the page has no outside files."""
    nav = " ".join(f'<a href="#{_anchor(s.title)}">{html.escape(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{_anchor(s.title)}"><h2>{html.escape(s.title)}</h2>'
                   + "".join(_block(b) for b in s.blocks) + "</section>" for s in sections)
    sub = f'<p class="subtitle">{_inline(subtitle)}</p>' if subtitle else ""
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport "
            f"content='width=device-width,initial-scale=1'><title>{html.escape(title)}</title><style>{STYLE}</style>"
            f"</head><body><h1>{html.escape(title)}</h1>{sub}<nav>{nav}</nav>{body}</body></html>\n")


def write_html(path: Path, title: str, sections: Sequence[Section], subtitle: str = "") -> Path:
    """:func:`render_html` written atomically to ``path``; returns the path."""
    path = Path(path)
    atomic_write_text(path, render_html(title, sections, subtitle))
    return path
