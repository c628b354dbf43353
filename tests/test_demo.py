import csv
import json
import re
import subprocess
import sys

import pytest

from mptkern import demo


def test_demo_pipeline_runs_every_stage_and_method(tmp_path, monkeypatch, capsys):
    """The demo's wiring at a seconds-long size: every stage, every method, the report table."""
    from mptkern.models.default import gguf_path

    try:
        gguf_path()
    except ImportError as exc:
        pytest.skip(str(exc))
    monkeypatch.setenv("MPTKERN_CACHE", str(tmp_path / "cache"))
    report = demo.run(demo.quick_config(str(tmp_path / "run")))
    for method in ("mpt", "prompt_tuning", "lora"):
        assert method in report
    assert "held-out targets" in report and "% of the model" in report
    # the end of the report: total and per-stage times, and where every output went
    assert re.search(r"^time: \d+ s in all; model and data \d+ s, teachers \d+ s, distill \d+ s, targets \d+ s$", report, re.M)
    for path in ("log.jsonl", "results.csv", "results.json", "student_adapter"):
        assert str((tmp_path / "run" / path).resolve()) in report
    with open(tmp_path / "run" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == {"mpt", "prompt_tuning", "lora"} and all(r["score"] for r in rows)
    gens = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == len(rows) and len({g["run"] for g in gens}) == len(rows)  # every scored run, once
    assert all(len(g["texts"]) == len(g["gold"]) == 2 for g in gens)  # quick_config: n_eval=2
    assert (tmp_path / "run" / "student_adapter" / "adapter_config.json").exists()
    assert (tmp_path / "run" / "results.json").exists()
    assert (tmp_path / "run" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"^budget: teachers \d+ steps .* eval requests$", report, re.M)
    trained = [r for r in rows if r["method"] in ("mpt", "prompt_tuning") and r["k"] != "0"]
    assert {r["method"] for r in trained} == {"mpt", "prompt_tuning"}
    for r in trained:  # every trained target prompt is a PEFT adapter that serves
        adapter = tmp_path / "run" / "adapters" / f"target-{r['task']}-k{r['k']}-s{r['seed']}-{r['method']}"
        assert (adapter / "adapter_config.json").exists(), adapter
    # `mptkern eval` scores the exported student on its source tasks
    (tmp_path / "eval.yaml").write_text("max_new_tokens: 4\ndata:\n  n_train: 4\n  n_eval: 2\n")
    from mptkern import cli

    assert cli.main(["eval", "--adapter", str(tmp_path / "run" / "student_adapter"), "--config", str(tmp_path / "eval.yaml")]) == 0
    out = capsys.readouterr().out
    assert "med_ner" in out and "(n=2)" in out


def test_cli_env_reports_backends():
    out = subprocess.run([sys.executable, "-m", "mptkern.cli", "env"], capture_output=True, text=True, check=True).stdout
    for key in ("torch", "triton", "backend torch", "backend triton", "backend cuda", "default model"):
        assert key in out
    assert "usable on" in out


@pytest.mark.parametrize("native", [True, False])
def test_the_cpu_demo_runs_bfloat16_only_where_the_cpu_multiplies_it(native, monkeypatch):
    monkeypatch.setattr(demo.backends, "cpu_bf16_native", lambda: native)
    assert demo.demo_config("x", device="cpu").dtype == ("bfloat16" if native else "float32")
    assert demo.demo_config("x", device="cuda").dtype == "auto"  # bf16 on CUDA
