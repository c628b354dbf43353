"""The README's examples run as written."""

import re
from pathlib import Path

import pytest

BLOCKS = re.findall(r"```python\n(.*?)```", (Path(__file__).resolve().parent.parent / "README.md").read_text(), re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"example{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(code, tmp_path, monkeypatch):
    if "load_default" in code or "MPTTrainer" in code:  # the embedded model, cached in tmp
        pytest.importorskip("gguf")
        monkeypatch.setenv("MPTKERN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # outputs land in tmp
    exec(compile(code, "README.md", "exec"), {})
