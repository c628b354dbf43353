"""CI runs the README's two commands as written: the lines of .ci/run equal the README's commands."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_both_readme_commands_as_written():
    commands = readme_commands()
    assert len(commands) == 2 and "mptkern demo" in commands[0] and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    one = re.search(r"^\(cd \"\$work/mptkern\" && (.*?)\) \| tee", ci, re.M)
    assert one is not None and one.group(1) == commands[0], "command 1 in .ci/run differs from the README's"
    lines = [line.strip() for line in ci.splitlines()]
    assert commands[1] in lines, "command 2 in .ci/run differs from the README's"
    assert lines.index(commands[1]) > next(i for i, x in enumerate(lines) if commands[0] in x)


def test_no_shipped_file_names_a_path_outside_the_repository():
    """A user's clone has nothing beside the repository: the package, docs, README and scripts may
    not point there (tests may read optional data from outside and skip without it)."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    outside = re.compile(r"\.\./" + "shared|/" + "work/")
    bad = []
    for name in files:
        if name.startswith("tests/") or name.startswith("bench/results/"):
            continue
        try:
            text = (ROOT / name).read_text()
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        bad += [f"{name}:{i}" for i, line in enumerate(text.splitlines(), 1) if outside.search(line)]
    assert not bad, f"paths outside the repository in {bad}"
