"""Trainer: config loading, atomic checkpoints, exact resume, fused vs reference paths."""

import dataclasses
import json
import os

import pytest
import torch

from mptkern.train import DataConfig, MPTTrainer, StageConfig, TargetConfig, TrainConfig, load_checkpoint, load_config, save_checkpoint
from mptkern.train.config import from_dict
from tests.tiny_models import small_smollm


@pytest.fixture(scope="module")
def small_backbone(tmp_path_factory):
    return small_smollm(tmp_path_factory.mktemp("cache"))


def _config(out, **kw):
    stage = StageConfig(steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2)
    base = TrainConfig(output_dir=str(out), prompt_len=4, max_new_tokens=4, data=DataConfig(n_train=8, n_eval=2),
                       teachers=stage, distill=stage, target=stage, target_init=TargetConfig(shots=[0, 2], seeds=[0]))
    return dataclasses.replace(base, **kw)


def _trainer(cfg, backbone):
    model, tok = backbone
    return MPTTrainer(cfg, model=model, tokenizer=tok)


def test_config_from_yaml_and_json(tmp_path):
    (tmp_path / "c.yaml").write_text("prompt_len: 7\nteachers:\n  steps: 3\ndistill_loss:\n  temperature: 4.0\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.prompt_len == 7 and cfg.teachers.steps == 3 and cfg.distill_loss.temperature == 4.0
    assert cfg.distill.steps == StageConfig().steps  # untouched defaults
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert load_config(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match=r"unknown StageConfig keys \['stepz'\]"):
        from_dict(TrainConfig, {"teachers": {"stepz": 1}})
    with pytest.raises(ValueError, match="must end in"):
        load_config(tmp_path / "c.txt")


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "s.ckpt"
    save_checkpoint(path, {"step": 1})

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path) == {"step": 1}
    assert sorted(os.listdir(tmp_path)) == ["s.ckpt"]


def test_resume_mid_stage_matches_uninterrupted_run(tmp_path, small_backbone, monkeypatch):
    full = _trainer(_config(tmp_path / "full"), small_backbone).train_teachers()

    class Crash(Exception):
        pass

    real_log = MPTTrainer._log

    def crash_at_step_3(self, record):  # dies after step 3's update, before the step-4 checkpoint
        real_log(self, record)
        if record.get("step") == 3:
            raise Crash

    monkeypatch.setattr(MPTTrainer, "_log", crash_at_step_3)
    with pytest.raises(Crash):
        _trainer(_config(tmp_path / "cut"), small_backbone).train_teachers()
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "cut" / "teachers.ckpt")["step"] == 2
    resumed = _trainer(_config(tmp_path / "cut"), small_backbone).train_teachers()
    assert torch.equal(resumed.prompts, full.prompts)
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 3, 4]  # step 3 redone from the step-2 checkpoint


def test_fused_paths_match_reference_paths(tmp_path, small_backbone):
    """A few steps of teachers and distillation: shared-prefix + fused loss vs concatenation + plain loss."""
    losses = {}
    for fused in (True, False):
        tr = _trainer(_config(tmp_path / str(fused), fused=fused), small_backbone)
        teachers = tr.train_teachers()
        tr.distill(teachers)
        losses[fused] = [load_checkpoint(tmp_path / str(fused) / f"{s}.ckpt")["losses"] for s in ("teachers", "distill")]
    for a, b in zip(losses[True], losses[False]):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=2e-4, atol=2e-4)
    assert losses[True][0][-1] < losses[True][0][0]  # the teachers learn


def test_full_run_writes_results_and_adapter(tmp_path, small_backbone):
    tr = _trainer(_config(tmp_path, baselines=["prompt_tuning"]), small_backbone)
    tr.suite["targets"] = tr.targets = tr.targets[:1]
    results = tr.run()
    assert {(r["method"], r["k"]) for r in results} == {("mpt", 0), ("mpt", 2), ("prompt_tuning", 0), ("prompt_tuning", 2)}
    assert all(0.0 <= r["score"] <= 1.0 for r in results)
    assert (tmp_path / "student_adapter" / "adapter_model.safetensors").exists()
    table = MPTTrainer.format_results(results)
    assert tr.targets[0].name in table and "trainable" in table


def test_paper_driver_lists_missing_data(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "python" / "paper_setting.py"
    proc = subprocess.run([sys.executable, str(script), "--model", str(tmp_path), "--data-root", str(tmp_path),
                           "--output-dir", str(tmp_path / "run"), "--dry-run"], capture_output=True, text=True)
    assert proc.returncode != 0 and "missing data files" in proc.stderr
