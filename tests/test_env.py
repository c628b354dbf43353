"""Versions against the declared ranges, and missing optional packages as one line, not a traceback."""

import importlib.metadata
import sys

import pytest

from mptkern import cli, env
from mptkern._optional import MissingDependency, declared, require


def test_env_checks_installed_versions_against_the_declared_ranges(monkeypatch, capsys):
    rows = {name: (installed, spec, status) for name, installed, spec, status in env.check_versions()}
    for name in ("torch", "transformers", "peft", "accelerate", "gguf"):  # the main job's packages are declared
        assert name in rows and rows[name][2] == "ok", rows.get(name)
    assert "<" in rows["transformers"][1]  # an upper bound: the newest release tested
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda n: "99.0" if n == "transformers" else real(n))
    assert "OUTSIDE the tested range" in env.report()["transformers"]
    assert env.warn_untested(sys.stdout) == 1
    assert capsys.readouterr().out.strip() == f"warning: transformers 99.0 is outside the tested range {rows['transformers'][1]}"


def test_missing_optional_package_is_one_line_with_the_install_command(monkeypatch, capsys, tmp_path):
    assert declared("datasets").startswith("datasets") and ">=3.0" in declared("datasets")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    from mptkern.data.readers import read_jsonl

    (tmp_path / "a.jsonl").write_text('{"q": 1}\n')
    with pytest.raises(MissingDependency, match=r"needs datasets, which is not installed: pip install 'datasets[<>=]"):
        read_jsonl(tmp_path / "a.jsonl", engine="datasets")
    monkeypatch.setattr(env, "format_report", lambda: require("mptkern_no_such_package", purpose="this report"))
    assert cli.main(["env"]) == 2
    err = capsys.readouterr().err
    assert err == "mptkern env: this report needs mptkern_no_such_package, which is not installed: pip install 'mptkern_no_such_package'\n"
