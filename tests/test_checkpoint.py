"""Checkpoint hygiene: weights_only loading, the config fingerprint a resume is checked against, and
the config keys that replaced the trainer's constants (LoRA, eval batching, teacher-cache batch)."""

import copy
import dataclasses
import json
import shutil

import pytest
import torch

from mptkern.demo import demo_config
from mptkern.prompts import MultitaskPrompt, TaskPrompts
from mptkern.train import MPTTrainer, StageConfig, TargetConfig, TrainConfig, load_checkpoint, save_checkpoint
from mptkern.train.config import FINGERPRINT_IGNORED, LoraBaselineConfig, config_fingerprint, from_dict
from tests.test_trainer import _config, _trainer, small_backbone  # noqa: F401 (small_backbone: a fixture)


class Crash(Exception):
    pass


def _crash_teachers_at_step_3(cfg, backbone, monkeypatch):
    """Train the teachers of ``cfg`` until step 3 dies (the last checkpoint is step 2's)."""
    real_log = MPTTrainer._log

    def crash(self, record):
        real_log(self, record)
        if record.get("stage") == "teachers" and record.get("step") == 3:
            raise Crash

    with monkeypatch.context() as m:
        m.setattr(MPTTrainer, "_log", crash)
        with pytest.raises(Crash):
            _trainer(cfg, backbone).train_teachers()
    assert load_checkpoint(f"{cfg.output_dir}/teachers.ckpt")["step"] == 2


class _Custom:  # a pickled custom class: what weights_only loading must refuse
    def __init__(self):
        self.value = 1


# ------------------------------------------------------------------ weights_only


def test_stage_checkpoint_loads_with_weights_only(tmp_path, small_backbone):
    tr = _trainer(_config(tmp_path), small_backbone)
    teachers = tr.train_teachers()
    state = torch.load(tmp_path / "teachers.ckpt", map_location="cpu", weights_only=True)
    assert set(state) == {"params", "optimizer", "scheduler", "step", "losses", "fingerprint"}
    assert state["step"] == 4 and len(state["losses"]) == 4
    torch.testing.assert_close(state["params"]["prompts"], teachers.prompts.detach())
    assert state["fingerprint"] == tr._fingerprint()
    assert state["fingerprint"]["config"]["dtype"] == "float32"  # "auto" on CPU, as resolved
    assert load_checkpoint(tmp_path / "teachers.ckpt", fingerprint=tr._fingerprint())["step"] == 4


def test_a_pickled_object_is_refused_on_save_and_on_load(tmp_path):
    with pytest.raises(TypeError, match=r"state\['extra'\]\['obj'\].*_Custom"):
        save_checkpoint(tmp_path / "a.ckpt", {"step": 1, "extra": {"obj": _Custom()}})
    assert not list(tmp_path.iterdir())  # nothing written
    torch.save({"step": 1, "obj": _Custom()}, tmp_path / "old.ckpt")  # as a careless writer would
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(tmp_path / "old.ckpt")


def test_a_checkpoint_without_fingerprint_resumes_with_a_warning(tmp_path):
    """Checkpoints of the format before fingerprints (same keys, no "fingerprint") still load."""
    fp = config_fingerprint(TrainConfig())
    save_checkpoint(tmp_path / "old.ckpt", {"params": {"w": torch.ones(2)}, "step": 3, "losses": [1.0, 0.5, 0.25]})
    with pytest.warns(UserWarning, match="before checkpoints recorded their config"):
        state = load_checkpoint(tmp_path / "old.ckpt", fingerprint=fp)
    assert state["step"] == 3


# ------------------------------------------------------------------ the fingerprint


def test_resume_with_a_changed_config_key_refuses_naming_it(tmp_path, small_backbone, monkeypatch):
    _trainer(_config(tmp_path), small_backbone).train_teachers()
    changed = _config(tmp_path, teachers=StageConfig(steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2, lr=0.1))
    with pytest.raises(ValueError, match=r"teachers\.lr: 0\.03 in the checkpoint, 0\.1 now") as err:
        _trainer(changed, small_backbone).train_teachers()
    assert "differing keys" in str(err.value) and "teachers.ckpt" in str(err.value)
    assert str(err.value).count(" in the checkpoint, ") == 1  # only the key that changed
    # distillation checks before it builds its teacher cache, too
    import mptkern.train.trainer as trainer_module

    built = []
    monkeypatch.setattr(trainer_module, "build_teacher_cache", lambda *a, **kw: built.append(1))
    fp = config_fingerprint(_config(tmp_path, rank=2), dtype="float32")
    save_checkpoint(tmp_path / "distill.ckpt", {"step": 1, "fingerprint": fp})
    tr = _trainer(_config(tmp_path), small_backbone)
    with pytest.raises(ValueError, match=r"rank: 2 in the checkpoint, 1 now"):
        tr.distill(TaskPrompts(len(tr.sources), 4, tr.hidden))
    assert not built


def test_the_cpu_and_gpu_demo_presets_do_not_resume_each_other(tmp_path):
    """Both presets write to runs/demo: the GPU one must refuse the CPU one's checkpoints."""
    cpu, gpu = demo_config(str(tmp_path), device="cpu"), demo_config(str(tmp_path), device="cuda")
    save_checkpoint(tmp_path / "teachers.ckpt", {"step": 30, "fingerprint": config_fingerprint(cpu, dtype="float32")})
    with pytest.raises(ValueError) as err:
        load_checkpoint(tmp_path / "teachers.ckpt", fingerprint=config_fingerprint(gpu, dtype="bfloat16"))
    msg = str(err.value)
    for part in ("prompt_len: 8 in the checkpoint, 32 now", "teachers.steps: 30 in the checkpoint, 300 now",
                 "dtype: 'float32' in the checkpoint, 'bfloat16' now"):
        assert part in msg, msg
    assert "device" not in msg and "max_new_tokens" not in msg  # ignored (the dtype "auto" resolves to counts)


def test_resume_with_the_same_config_resumes(tmp_path, small_backbone, monkeypatch):
    full = _trainer(_config(tmp_path / "full"), small_backbone).train_teachers()
    _crash_teachers_at_step_3(_config(tmp_path / "cut"), small_backbone, monkeypatch)
    resumed = _trainer(_config(tmp_path / "cut"), small_backbone).train_teachers()
    assert torch.equal(resumed.prompts, full.prompts)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3, 4]  # resumed from step 2, not restarted


def test_only_ignored_keys_changed_resumes(tmp_path, small_backbone, monkeypatch):
    full = _trainer(_config(tmp_path / "full"), small_backbone).train_teachers()
    _crash_teachers_at_step_3(_config(tmp_path / "cut"), small_backbone, monkeypatch)
    shutil.move(tmp_path / "cut", tmp_path / "moved")  # a new output_dir
    every = StageConfig(steps=4, batch_size=4, warmup_steps=1, checkpoint_every=3)
    changed = _config(tmp_path / "moved", device="cpu", max_new_tokens=7, eval_batch_size=3, eval_max_running=5,
                      teachers=every, distill=every, target=every,
                      distill_loss=dataclasses.replace(TrainConfig().distill_loss, teacher_cache="off",
                                                       teacher_cache_batch_size=5))
    flat_before = _flat(_config(tmp_path / "cut"))
    assert {k for k, v in _flat(changed).items() if flat_before[k] != v} == set(FINGERPRINT_IGNORED)  # all of them
    resumed = _trainer(changed, small_backbone).train_teachers()
    assert torch.equal(resumed.prompts, full.prompts)
    steps = [json.loads(line)["step"] for line in (tmp_path / "moved" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3, 4]


def _flat(cfg):
    from mptkern.train.config import _flatten

    return _flatten(cfg.to_dict())


def test_a_key_newer_than_the_checkpoint_counts_as_its_default(tmp_path):
    old = config_fingerprint(TrainConfig())
    del old["config"]["lora.rank"]  # as written before the key existed
    save_checkpoint(tmp_path / "s.ckpt", {"step": 1, "fingerprint": old})
    assert load_checkpoint(tmp_path / "s.ckpt", fingerprint=config_fingerprint(TrainConfig()))["step"] == 1
    changed = config_fingerprint(TrainConfig(lora=LoraBaselineConfig(rank=8)))
    with pytest.raises(ValueError, match=r"lora\.rank: 4 in the checkpoint, 8 now"):
        load_checkpoint(tmp_path / "s.ckpt", fingerprint=changed)


# ------------------------------------------------------------------ config keys


def test_old_configs_load_and_unknown_keys_are_named(tmp_path):
    old = {"prompt_len": 7, "max_new_tokens": 8, "teachers": {"steps": 3},
           "distill_loss": {"temperature": 4.0, "teacher_cache": "off"}}  # no lora, eval_max_running, ...
    cfg = from_dict(TrainConfig, old)
    assert cfg.lora == LoraBaselineConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    assert (cfg.max_length, cfg.eval_max_running, cfg.distill_loss.teacher_cache_batch_size) == (256, 64, 32)
    with pytest.raises(ValueError, match=r"unknown LoraBaselineConfig keys \['rnak'\]"):
        from_dict(TrainConfig, {"lora": {"rnak": 2}})
    with pytest.raises(ValueError, match=r"unknown TrainConfig keys \['max_lenght'\]"):
        from_dict(TrainConfig, {"max_lenght": 64})
    with pytest.raises(ValueError, match="lora rank"):
        LoraBaselineConfig(rank=0)
    with pytest.raises(ValueError, match="eval_max_running"):
        TrainConfig(eval_max_running=0)


def test_lora_settings_come_from_the_config(tmp_path, small_backbone):
    from peft import get_peft_model

    lora = LoraBaselineConfig(rank=3, alpha=5, dropout=0.25, target_modules=["q_proj", "o_proj"])
    tr = _trainer(_config(tmp_path, lora=lora), small_backbone)
    c = tr.model.config
    head_dim = c.hidden_size // c.num_attention_heads
    q_out = c.num_attention_heads * head_dim
    expected = c.num_hidden_layers * 3 * ((c.hidden_size + q_out) + (q_out + c.hidden_size))  # q_proj + o_proj
    assert tr._lora_size() == expected
    peft_model = get_peft_model(copy.deepcopy(tr.model), tr._lora_config())
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == expected
    pc = peft_model.peft_config["default"]
    assert (pc.r, pc.lora_alpha, pc.lora_dropout, set(pc.target_modules)) == (3, 5, 0.25, {"q_proj", "o_proj"})
    default = _trainer(_config(tmp_path / "d"), small_backbone)
    assert default._lora_size() == c.num_hidden_layers * 4 * (
        (c.hidden_size + q_out) + (c.hidden_size + c.num_key_value_heads * head_dim))  # r=4 on q_proj, v_proj


def test_max_length_from_the_config_reaches_the_collator(tmp_path, small_backbone):
    default = _trainer(_config(tmp_path / "d"), small_backbone)
    task = default.sources[0]
    longest = default.data_report[task.name]["train"]["source"]["max"]  # source alone; + answer is longer
    assert len(default._collator([task])(task.train)["input_ids"][0]) > longest
    tr = _trainer(_config(tmp_path / "cut", max_length=longest), small_backbone)
    assert tr._collator([task]).max_length == longest
    batch = tr._collator(tr.sources)(tr.sources[0].train)
    assert batch["input_ids"].shape[1] == longest  # the longest rows were cut to max_length
    assert tr.data_report[task.name]["train"]["cut"] > 0
    assert json.loads((tmp_path / "cut" / "data.json").read_text())["max_length"] == longest


def test_eval_keys_reach_evaluation_and_the_teacher_cache(tmp_path, small_backbone, monkeypatch):
    import mptkern.train.trainer as trainer_module

    calls = []

    def fake_evaluate(model, tokenizer, runs, **kw):
        calls.append(kw)
        return {r.name: {"metric": "accuracy", "score": 0.0} for r in runs}

    monkeypatch.setattr(trainer_module, "evaluate_runs", fake_evaluate)
    cfg = _config(tmp_path, max_length=200, eval_max_running=5, baselines=[], target_init=TargetConfig(shots=[0], seeds=[0]),
                  distill_loss=dataclasses.replace(TrainConfig().distill_loss, teacher_cache="memory",
                                                   teacher_cache_batch_size=3))
    tr = _trainer(cfg, small_backbone)
    tr.targets = tr.targets[:1]
    teachers = TaskPrompts(len(tr.sources), 4, tr.hidden)

    class Stop(Exception):
        pass

    def fake_cache(*args, **kw):
        calls.append(kw)
        raise Stop

    monkeypatch.setattr(trainer_module, "build_teacher_cache", fake_cache)
    with pytest.raises(Stop):
        tr.distill(teachers)
    assert calls[-1]["batch_size"] == 3 and calls[-1]["mode"] == "memory"
    student = MultitaskPrompt(len(tr.sources), 4, tr.hidden, task_names=[t.name for t in tr.sources])
    tr.adapt_targets(student)
    assert calls[-1]["max_length"] == 200 and calls[-1]["max_running"] == 5


def test_max_running_reaches_the_engine(small_backbone, monkeypatch):
    import mptkern.train.evaluation as evaluation
    from mptkern.data import make_suite

    seen = {}

    class Stop(Exception):
        pass

    def fake_engine(model, tokenizer, prompts, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(evaluation, "MultiTaskEngine", fake_engine)
    task = make_suite(seed=0, n_train=2, n_eval=3)["targets"][0]
    model, tok = small_backbone
    with pytest.raises(Stop):
        evaluation.evaluate_runs(model, tok, [evaluation.EvalRun("x", task, None)], max_new_tokens=4, max_running=2)
    assert seen["max_running"] == 2  # of 3 requests
    with pytest.raises(ValueError, match="max_running"):
        evaluation.evaluate_runs(model, tok, [evaluation.EvalRun("x", task, None)], max_new_tokens=4, max_running=0)


def test_a_given_model_runs_in_its_own_dtype_and_an_explicit_other_dtype_fails(tmp_path, small_backbone):
    """The fingerprint records the dtype the backbone really runs in: a float32 model given with
    ``dtype: bfloat16`` would otherwise record bf16 over float32 weights."""
    with pytest.raises(ValueError, match=r"config dtype 'bfloat16' but the given model's parameters are torch.float32"):
        _trainer(_config(tmp_path, dtype="bfloat16"), small_backbone)
    tr = _trainer(_config(tmp_path, dtype="auto"), small_backbone)
    assert tr.dtype == torch.float32 and tr._fingerprint()["config"]["dtype"] == "float32"
