"""The README's API example runs as written."""

import re

from helpers import REPO_ROOT


def test_readme_api_example_runs(capsys):
    text = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert "'cpp': Availability(ok=True" in capsys.readouterr().out
