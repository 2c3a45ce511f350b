"""HTML pieces of the reports: escaping, tables, sections, embedded plots, the page itself.

Every piece of text that came from a user or a model goes through `esc`; plots are PNGs
embedded as base64, so a page references nothing outside itself and runs no script.
"""

from __future__ import annotations

import base64
import html
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

from rlhfkit.eval.plots import png


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def img(fig, alt: str) -> str:
    data = base64.b64encode(png(fig)).decode("ascii")
    return f'<img class="plot" src="data:image/png;base64,{data}" alt="{esc(alt)}">'


CSS = """
*{box-sizing:border-box}
body{font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2937;background:#f3f4f6;margin:0}
main{max-width:1180px;margin:0 auto;padding:28px 24px 48px}
header h1{font-size:1.7em;margin:0 0 4px;color:#111827}
header p{margin:2px 0;color:#6b7280}
section{background:#fff;border:1px solid #e5e7eb;border-radius:10px;padding:16px 20px;margin:18px 0}
section h2{font-size:1.15em;margin:0 0 10px;color:#111827}
section h3{font-size:1em;margin:16px 0 6px;color:#374151}
p.note{color:#6b7280;margin:4px 0 10px;font-size:.93em}
table{border-collapse:collapse;margin:6px 0 10px;font-size:.93em;width:auto}
div.wide{overflow-x:auto}
th,td{padding:5px 9px;border-bottom:1px solid #e5e7eb;text-align:left;vertical-align:top}
th{background:#f9fafb;font-weight:600;color:#374151}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
span.ci{color:#6b7280;font-size:.9em}
table.samples{width:100%;table-layout:fixed}
table.samples td{font-size:.9em}
table.samples pre{white-space:pre-wrap;word-break:break-word;margin:0;
  font:12.5px/1.45 ui-monospace,Menlo,Consolas,monospace}
.ok{color:#15803d;font-weight:600}.bad{color:#b91c1c;font-weight:600}
img.plot{max-width:100%;height:auto;display:block;margin:6px 0}
nav{margin:10px 0 0;font-size:.92em}
nav a{color:#2563eb;text-decoration:none;margin-right:14px}
"""


def ci_cell(block: dict | None, *, pct: bool = True) -> str:
    if not block or block.get("mean") is None:
        return "–"
    f = (lambda v: f"{v:.1%}") if pct else (lambda v: f"{v:.3f}")
    low, high = block.get("ci_low"), block.get("ci_high")
    interval = f' <span class="ci">[{f(low)}, {f(high)}]</span>' if low is not None and high is not None else ""
    return f"{f(block['mean'])}{interval}"


def num(x: Any, fmt: str = "{:.3f}") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return fmt.format(x)


def html_table(head: Sequence[str], rows: Iterable[Sequence[str]], *, numeric_from: int = 1,
           cls: str = "") -> str:
    """An HTML table; `head` is escaped here, cells must already be HTML."""
    # Non-breaking hyphens: a narrow column wraps "distinct-2" between words, never inside one.
    th = "".join(f"<th>{esc(h).replace('-', chr(0x2011))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i >= numeric_from else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    klass = f' class="{cls}"' if cls else ""
    return f'<div class="wide"><table{klass}><tr>{th}</tr>{body}</table></div>'


def section(anchor: str, title: str, body: str, note: str = "") -> str:
    note_html = f'<p class="note">{note}</p>' if note else ""
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{note_html}{body}</section>'


def page(title: str, header_html: str, body: str) -> str:
    """A whole self-contained page: `title` is escaped here, `header_html` and `body` are HTML."""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
            f"<header><h1>{esc(title)}</h1>{header_html}"
            f"<p>generated {esc(time.strftime('%Y-%m-%d %H:%M'))} by rlhfkit</p></header>{body}</main></body></html>")
