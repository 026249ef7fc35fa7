"""A griffe extension for the API site: docstrings written for Sphinx, read as Markdown.

Two rewrites once the package is loaded, so the sources stay as they are:

- Sphinx roles (``:class:`~dropgrad.DropGrad` ``, ``:func:``, ``:meth:``, ``:mod:``, ...)
  become cross-references (``[`DropGrad`][dropgrad.DropGrad]``) when they name a public
  object of the package (names are looked up from where the docstring is, as Python
  would); a role naming anything else (torch, a private helper) stays plain code.
- A doctest in the prose (``>>>`` at the start of a line, e.g. in a module's docstring)
  is fenced as Python code, up to the next blank line.
- An ``Example:`` section is read as ``Examples:`` (griffe's Google-style parser turns
  the ``>>>`` lines of ``Examples:`` into code; ``Example:`` would be plain Markdown,
  where a doctest's output such as ``[0.0, 0.1]`` after ``[...]`` reads as a link).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_TITLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_DOCTEST = re.compile(r"^>>> .*?(?=\n\s*\n|\Z)", re.MULTILINE | re.DOTALL)
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc):`(~?)([\w.]+)`")


def _lookup(package: Any, path: str) -> Any:
    try:
        return package.modules_collection[path]
    except (KeyError, ValueError, AttributeError):
        return None


def _public(path: str) -> bool:
    return not any(part.startswith("_") for part in path.split("."))


def _resolve(package: Any, owner: Any, target: str) -> str | None:
    """The documented object's path that ``target`` names, seen from ``owner``; None if none."""
    head, _, rest = target.partition(".")
    scopes = [owner] if owner.is_class or owner.is_module else []
    scopes += [owner.parent, owner.module, package]
    for scope in scopes:
        if scope is None:
            continue
        try:
            base = scope.resolve(head)  # a member or an import of the scope, as a full path
        except Exception:  # noqa: BLE001 - griffe raises NameResolutionError and friends
            continue
        path = f"{base}.{rest}" if rest else base
        found = _lookup(package, path)
        if found is not None:
            found = found.final_target if getattr(found, "is_alias", False) else found
            if _public(found.path):
                return found.path
    found = _lookup(package, target)
    return found.path if found is not None and _public(found.path) else None


class ExampleSections(griffe.Extension):
    def on_package(self, *, pkg: Any, **kwargs: Any) -> None:
        self._walk(pkg, pkg)

    def _walk(self, package: Any, obj: Any) -> None:
        docstring = obj.docstring
        if docstring is not None:
            value = _TITLE.sub(r"\1Examples:", docstring.value)
            value = _DOCTEST.sub(lambda m: f"```python\n{m.group(0)}\n```", value)
            docstring.value = _ROLE.sub(lambda m: self._link(package, obj, m), value)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(package, member)

    @staticmethod
    def _link(package: Any, owner: Any, match: re.Match[str]) -> str:
        tilde, target = match.groups()
        shown = target.rsplit(".", 1)[-1] if tilde else target
        path = _resolve(package, owner, target)
        return f"[`{shown}`][{path}]" if path else f"`{shown}`"
