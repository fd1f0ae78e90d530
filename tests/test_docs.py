"""Docs that quote the code must agree with it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_rejected_inputs_table_is_current():
    spec = importlib.util.spec_from_file_location(
        "rejected_inputs", ROOT / "scripts" / "rejected_inputs.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    doc = (ROOT / "docs" / "reliability.md").read_text()
    assert module.table() in doc, "docs/reliability.md: rerun scripts/rejected_inputs.py"
