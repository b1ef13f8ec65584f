"""The README's Python example runs as written (on the demo model)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_model_card_example_runs():
    block = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("인간처럼 생각하고, 행동하는 '지능'을 통해 인류가 이제까지 풀지 못했던")
    assert len(result.stdout) > 60


def test_serving_examples_run():
    """The engine section's two Python examples (sync and asyncio) run as written."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Serving: the engine"):text.index("## The CLI")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    for block in blocks:
        result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip()
