"""The class-form snippets of docs/integrations.md run as they stand, each in a fresh namespace,
and every ``print(...)  # output`` line there prints what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from _compat import transformers_skip_reason
from _torchvision_stub import import_timm_optim

DOC = Path(__file__).resolve().parent.parent / "docs" / "integrations.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
CLAIM = re.compile(r"^print\(.*\)\s+# (.+)$", re.MULTILINE)


def _section() -> str:
    text = DOC.read_text()
    start = text.index("## The class form")
    end = text.index("\n## ", start + 1)
    return text[start:end]


BLOCKS = BLOCK.findall(_section())


def _needs(block: str) -> str | None:
    """Why this block cannot run here (None: it can)."""
    if "transformers" in block and transformers_skip_reason():
        return transformers_skip_reason()
    if "timm" in block and import_timm_optim() is None:  # imports timm (through the stub if need be)
        return "timm is not installed (CI installs it: pip install --no-deps timm)"
    return None


def test_the_section_has_a_snippet_per_integration():
    joined = "\n".join(BLOCKS)
    for marker in ("optimizer_cls_and_kwargs", "LightningCLI", "PPO", "DQN", "create_optimizer_v2", "_partial_"):
        assert marker in joined, marker


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_snippet_runs_and_prints_what_it_says(block, tmp_path, monkeypatch, capsys):
    reason = _needs(block)
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(tmp_path)  # the snippets write their output directories here
    exec(compile(block, str(DOC), "exec"), {"__name__": "docs_snippet"})
    claims = CLAIM.findall(block)
    printed = capsys.readouterr().out.strip().splitlines()[-len(claims) :] if claims else []
    assert printed == claims
