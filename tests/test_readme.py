"""The README's Python examples run as a test, in order, in one namespace, so they cannot rot."""

import re
from pathlib import Path

from _compat import requires_named_optimizers

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[str]:
    return BLOCK.findall(text)


def test_readme_has_python_examples():
    assert len(python_blocks(README.read_text())) >= 5


@requires_named_optimizers  # the README builds optimizers from named_parameters()
def test_readme_examples_run(capsys):
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(python_blocks(README.read_text())):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message is the point
            raise AssertionError(f"README python block {i} failed: {exc!r}\n{block}") from exc


@requires_named_optimizers
def test_readme_printed_lists_are_true(capsys):
    """A README line `print(...)  # [..]` states its output; check every such claim."""
    namespace: dict = {"__name__": "readme"}
    checked = 0
    for block in python_blocks(README.read_text()):
        exec(compile(block, "README.md", "exec"), namespace)
        printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
        claims = re.findall(r"^print\(.*\)\s+# (\[[^\]]*\])", block, re.MULTILINE)
        assert len(claims) == len(printed)
        for claim, line in zip(claims, printed):
            assert line == claim
            checked += 1
    assert checked >= 3
