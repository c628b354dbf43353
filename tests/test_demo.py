import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from mptkern import demo  # noqa: E402
from mptkern.prompts import MultitaskPrompt  # noqa: E402


def test_demo_examples_are_deterministic_and_cover_every_task():
    a, b = demo.make_examples(5, seed=3), demo.make_examples(5, seed=3)
    assert a == b and a != demo.make_examples(5, seed=4)
    assert sorted({t for t, _, _ in a}) == list(range(len(demo.TASKS)))


def test_multitask_prompt_parameters_and_forward():
    p = MultitaskPrompt(4, 6, 10, rank=2)
    assert p.prompt_embeddings.shape == (6, 10)
    assert p.prefix_task_cols.shape == (4, 6, 2) and p.prefix_task_rows.shape == (4, 2, 10)
    ids = torch.tensor([3, 1])
    expect = p.prompt_embeddings * (p.prefix_task_cols[ids] @ p.prefix_task_rows[ids])
    torch.testing.assert_close(p(ids), expect)


def test_demo_trains_the_prompt(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from mptkern.models.default import gguf_path

    try:
        gguf_path()
    except ImportError as exc:
        pytest.skip(str(exc))
    monkeypatch.setenv("MPTKERN_CACHE", str(tmp_path))
    res = demo.run(steps=6, prompt_len=4, batch_size=8, lr=3e-2, n_eval=4, device="cpu")
    d = 576
    assert res["trainable"] == 4 * d + len(demo.TASKS) * (4 + d)
    assert all(map(torch.isfinite, torch.tensor(res["losses"])))
    assert res["losses"][-1] < res["losses"][0]  # the prompt learns: first batch loss is ~5 nats
    table = demo.format_table(res)
    assert "exact match" in table and all(name in table for name in demo.TASKS)


def test_cli_env_reports_backends():
    out = subprocess.run([sys.executable, "-m", "mptkern.cli", "env"], capture_output=True, text=True, check=True).stdout
    for key in ("torch", "triton", "backend torch", "backend triton", "backend cuda", "default model"):
        assert key in out
    assert "usable on" in out
