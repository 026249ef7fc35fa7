"""A griffe extension for the API site: read a docstring's ``Example:`` section as ``Examples:``.

The package's docstrings title their doctests ``Example:``; griffe's Google-style parser
knows only ``Examples:`` as the section whose ``>>>`` lines become code, and reads
``Example:`` as an admonition of plain Markdown, where a doctest's output such as
``[0.0, 0.1]`` after ``[...]`` reads as a reference link. Renaming the title at load time
keeps the sources as they are.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_TITLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_object(self, *, obj: Any, **kwargs: Any) -> None:
        docstring = getattr(obj, "docstring", None)
        if docstring is not None and "Example:" in docstring.value:
            docstring.value = _TITLE.sub(r"\1Examples:", docstring.value)
