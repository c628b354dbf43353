"""Smoke tests of the benchmark harness and bench/bench_prompt_embed.py on a tiny CPU shape."""

import csv
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
TINY = ["--device", "cpu", "--B", "4", "--l", "5", "--d", "64", "--K", "3", "--warmup", "1", "--rep", "5"]


@pytest.fixture
def bench(monkeypatch):
    """The bench scripts import each other as top-level modules, as when run from bench/."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_prompt_embed

    return bench_prompt_embed


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_bench_runs_and_writes_rows(bench, tmp_path):
    out = tmp_path / "prompt_embed.csv"
    bench.main([*TINY, "--out", str(out)])
    rows = _read(out)
    got = {(r["contender"], r["mode"]) for r in rows}
    for name in ("mptkern-torch", "peft", "eager"):
        assert {(name, "fwd"), (name, "fwd+bwd")} <= got
    assert not any(r["contender"] == "mptkern-triton" for r in rows), "the Triton interpreter must never be timed"
    assert all(float(r["ms"]) > 0 and r["commit"] and r["device"] and r["torch"] for r in rows)
    assert all(float(r["speedup_vs_peft"]) == 1.0 for r in rows if r["contender"] == "peft")
    bench.main([*TINY, "--out", str(out)])  # a second run appends under the same header
    assert len(_read(out)) == 2 * len(rows)

    import plot

    assert plot.plot(out).stat().st_size > 0


def test_wrong_forward_is_refused(bench, tmp_path, monkeypatch):
    real = bench.decomposed_prompts
    monkeypatch.setattr(bench, "decomposed_prompts", lambda *a, **k: real(*a, **k) * 1.1)
    out = tmp_path / "prompt_embed.csv"
    with pytest.raises(SystemExit, match="mptkern-torch"):
        bench.main([*TINY, "--out", str(out)])
    names = {r["contender"] for r in _read(out)}
    assert "mptkern-torch" not in names and {"peft", "eager"} <= names


class _WrongGrad(torch.autograd.Function):
    """Identity forward; backward scales d_shared only."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * 1.1


def test_wrong_gradient_is_refused(bench):
    shared, cols, rows, ids, grad_out = bench.make_inputs(4, 5, 64, 3, 1, torch.float32, torch.device("cpu"))
    ref = bench.Contender("eager", lambda: bench.eager(shared, cols, rows, ids), (shared, cols, rows))
    bad = bench.Contender("bad", lambda: bench.eager(_WrongGrad.apply(shared), cols, rows, ids), (shared, cols, rows))
    with pytest.raises(bench.Disagreement, match="bad d_shared"):
        bench.check_agreement(bad, ref, grad_out)
    bench.check_agreement(ref, ref, grad_out)


def test_append_rows_refuses_a_different_header(bench, tmp_path):
    import harness

    out = tmp_path / "x.csv"
    harness.append_rows(out, [{"op": "a", "ms": 1.0}], "cpu")
    with pytest.raises(ValueError, match="columns"):
        harness.append_rows(out, [{"op": "a", "ms": 1.0, "gbs": 2.0}], "cpu")
    assert len(_read(out)) == 1


def test_prefix_attention_bench_on_cpu_checks_agreement_and_refuses_to_time(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_prefix_attention

    out = tmp_path / "prefix_attention.csv"
    assert bench_prefix_attention.main(["--device", "cpu", "--out", str(out)]) == 0
    assert "timing refused" in capsys.readouterr().out
    assert not out.exists()
    monkeypatch.setattr(bench_prefix_attention, "prefix_attention_decode", lambda *a, **k: torch.zeros(3, 4, 16))
    with pytest.raises(bench_prefix_attention.Disagreement, match="decode"):
        bench_prefix_attention.smoke()


def test_engine_bench_small_run_checks_agreement_and_writes_rows(monkeypatch, tmp_path, capsys):
    pytest.importorskip("gguf")
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("MPTKERN_CACHE", str(tmp_path / "cache"))
    import bench_engine

    out = tmp_path / "engine.csv"
    assert bench_engine.main(["--small", "--out", str(out)]) == 0
    written = _read(out)
    # hf-peft is timed only where peft's generate agrees with plain generate (not with transformers >= 5.24)
    peft_ok = "hf-peft left out" not in capsys.readouterr().out
    contenders = ["mptkern-engine", "hf-generate"] + (["hf-peft"] if peft_ok else [])
    # --small times two concurrency levels, 1 and 8 requests, each with every contender
    assert [(r["requests"], r["contender"]) for r in written] == [(n, c) for n in ("1", "8") for c in contenders]
    level = {r["contender"]: r for r in written if r["requests"] == "8"}
    assert float(level["hf-generate"]["throughput_vs_hf"]) == 1.0
    assert all(int(r["tokens"]) > 0 and float(r["tokens_per_s"]) > 0 for r in written)
    assert int(level["mptkern-engine"]["identical_requests"]) == 8
    assert float(level["mptkern-engine"]["kv_peak_mib"]) > 0

    # a wrong PEFT baseline is left out, and the run still times the others
    real_generators = bench_engine.hf_generators

    def wrong_peft(*a):
        gens = real_generators(*a)
        plain = gens["hf-generate"]
        return {**gens, "hf-peft": lambda *x, **k: plain(*x, **k) * 0 + 198}

    monkeypatch.setattr(bench_engine, "hf_generators", wrong_peft)
    assert bench_engine.main(["--small", "--out", str(out)]) == 0
    assert "hf-peft left out" in capsys.readouterr().out
    assert [r["contender"] for r in _read(out)[len(written):]] == ["mptkern-engine", "hf-generate"] * 2

    # a wrong engine stops the run before anything is timed or written
    real = bench_engine.engine_run
    wrong = lambda *a: [([t + 1 for t in tokens], *rest) for tokens, *rest in real(*a)]  # noqa: E731
    monkeypatch.setattr(bench_engine, "engine_run", wrong)
    n = len(_read(out))
    with pytest.raises(bench_engine.harness.Disagreement, match="greedy tokens differ"):
        bench_engine.main(["--small", "--out", str(out)])
    assert len(_read(out)) == n


def test_recipe_bench_runs_both_ways_and_writes_rows(monkeypatch, tmp_path, capsys):
    pytest.importorskip("gguf")
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("MPTKERN_CACHE", str(tmp_path / "cache"))
    import bench_recipe

    out = tmp_path / "recipe.csv"
    assert bench_recipe.main(["--preset", "quick", "--out", str(out)]) == 0
    rows = _read(out)
    assert [(r["way"], r["stage"]) for r in rows] == [(w, s) for w in ("old", "new") for s in ("teachers", "distill", "targets", "all")]
    assert all(float(r["seconds"]) > 0 for r in rows)
    old_all, new_all = rows[3], rows[7]
    assert float(old_all["seconds"]) == pytest.approx(sum(float(r["seconds"]) for r in rows[:3]), abs=0.05)
    assert float(new_all["speedup_vs_old"]) == pytest.approx(float(old_all["seconds"]) / float(new_all["seconds"]), abs=0.01)
    done, total = map(int, rows[0]["same_scores"].split("/"))
    assert total == int(rows[0]["runs"]) > 0 and 0 <= done <= total
    assert "scores equal run for run" in capsys.readouterr().out
