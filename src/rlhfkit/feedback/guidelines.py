"""The project owner's labeling guidelines: Markdown rendered to safe HTML.

markdown-it-py (already installed with `rich`) with raw HTML turned off: any tag in the
text is escaped and shown as text, and its link validator drops `javascript:`, `vbscript:`
and `file:` URLs. The result is marked safe for Jinja here, once, so templates never need
`|safe`.
"""

from __future__ import annotations

from markdown_it import MarkdownIt
from markupsafe import Markup

_renderer = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False}).enable("table")

DEFAULT_GUIDELINES = """\
# Guidelines

Compare the responses to the prompt and choose the one that is **more helpful, honest
and harmless**. When two responses are equally good, mark a tie; when neither is
acceptable, mark *both bad*.
"""


def render_guidelines(markdown_text: str) -> Markup:
    return Markup(_renderer.render(markdown_text or DEFAULT_GUIDELINES))
