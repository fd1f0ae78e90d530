"""The README's Python examples run as written (on a CPU machine: the torch backend)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of the README section whose heading starts with ``section``."""
    text = README.read_text()
    start = text.index(f"\n## {section}")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end >= 0 else None]
    return re.findall(r"```python\n(.*?)```", body, flags=re.DOTALL)


@pytest.mark.parametrize("section", ["A first call", "API"])
def test_readme_example_runs(section, capsys, clean_dispatch, monkeypatch):
    if not torch.cuda.is_available():
        # What `auto` picks on a CPU machine without Triton's interpreter (which the test
        # session turns on for the Triton tests).
        monkeypatch.setenv("ATTNMERGE_BACKEND", "torch")
    (block,) = python_blocks(section)
    try:
        exec(compile(block, f"README.md ({section})", "exec"), {})
    finally:
        torch.set_default_device(None)  # the API example sets it
    if section == "A first call":
        shapes = capsys.readouterr().out
        assert "torch.Size([4, 8, 128]) torch.bfloat16 torch.Size([8, 4])" in shapes
