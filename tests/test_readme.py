"""The README's promises: its Python example runs, and Quick start is exactly two commands."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_quick_start_is_two_commands():
    m = re.search(r"^## Quick start\s*$.*?^```[^\n]*\n(.*?)^```", README, re.M | re.S)
    assert m, "README needs a '## Quick start' section opening with a fenced block"
    commands = [line for line in m.group(1).splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(commands) == 2, commands


def test_python_example_runs():
    block = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert tuple(scope["o"].shape) == (1, 1000, 4, 64)
    assert tuple(scope["state"].shape) == (1, 4, 64, 64)
    assert tuple(scope["new_tokens"].shape) == (2, 8)
    assert tuple(scope["tokens"].shape) == (2, 8)
    assert scope["cache"].nbytes() == sum(scope["cache"].breakdown().values())
