"""The recipe on its fast paths: the batched prompt grid equals solo runs, LoRA runs share one
backbone, the teacher cache equals recomputing, engine evaluation equals the HF-generate path."""

import dataclasses
from pathlib import Path

import pytest
import torch

from mptkern.data import InputFormat, make_suite
from mptkern.eval import score
from mptkern.prompts import MultitaskPrompt, TaskPrompts
from mptkern.train import DataConfig, MPTTrainer, StageConfig, TargetConfig, TrainConfig, load_checkpoint
from mptkern.train.evaluation import EvalRun, evaluate_runs, generation_budget
from mptkern.train.grid import PROMPT_METHODS, PromptStack, Run, per_run_mean
from tests import tiny_models
from tests.test_data import word_tokenizer


@pytest.fixture(scope="module")
def small_backbone(tmp_path_factory):
    return tiny_models.small_smollm(tmp_path_factory.mktemp("cache"))


def _trainer(out, backbone, **kw):
    stage = StageConfig(steps=3, batch_size=3, warmup_steps=1, checkpoint_every=2)
    cfg = TrainConfig(output_dir=str(out), prompt_len=4, max_new_tokens=4, data=DataConfig(n_train=8, n_eval=2),
                      teachers=stage, distill=stage, target=stage, target_init=TargetConfig(shots=[0, 2, 4], seeds=[0, 1]))
    model, tok = backbone
    return MPTTrainer(dataclasses.replace(cfg, **kw), model=model, tokenizer=tok)


def _student(tr):
    torch.manual_seed(0)
    return MultitaskPrompt(len(tr.sources), tr.config.prompt_len, tr.hidden, task_names=[t.name for t in tr.sources])


def test_batched_grid_equals_runs_trained_one_by_one(tmp_path, small_backbone):
    tr = _trainer(tmp_path, small_backbone)
    tr.targets = tr.targets[:2]
    student = _student(tr)
    runs = [r for r in tr.target_runs() if r.method in PROMPT_METHODS and r.k]
    assert len(runs) == 2 * 2 * 2 * 2  # targets x k x seeds x methods, of both prompt kinds
    stack = tr.train_prompt_grid(runs, [tr.target_prompt(r, student) for r in runs], name="grid")
    grid_losses = torch.tensor(load_checkpoint(tmp_path / "grid.ckpt")["losses"])  # (steps, runs)
    assert grid_losses.shape == (3, len(runs))
    for i, run in enumerate(runs):
        solo = tr.train_prompt_grid([run], [tr.target_prompt(run, student)], name=f"solo-{i}")
        solo_losses = torch.tensor(load_checkpoint(tmp_path / f"solo-{i}.ckpt")["losses"])[:, 0]
        torch.testing.assert_close(grid_losses[:, i], solo_losses, rtol=1e-5, atol=1e-5)
        for (name, a), (_, b) in zip(stack.slots[i].named_parameters(), solo.slots[0].named_parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{run.name} {name}")
        start = tr.target_prompt(run, student)
        assert any(not torch.equal(a, b) for a, b in zip(start.parameters(), solo.slots[0].parameters()))  # it trained


def test_per_run_mean_and_stack_validation():
    loss = torch.tensor([1.0, 2.0, 3.0, 10.0, 4.0])
    torch.testing.assert_close(per_run_mean(loss, torch.tensor([0, 0, 2, -1, 2]), 3), torch.tensor([1.5, 0.0, 3.5]))
    a, b = TaskPrompts(1, 4, 8), TaskPrompts(1, 5, 8)
    with pytest.raises(ValueError, match="same"):
        PromptStack([a, b])
    stack = PromptStack([a, TaskPrompts(1, 4, 8)])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        stack(torch.tensor([2]))
    out = stack.write_rows(torch.tensor([1, 0]), torch.zeros(8, 8), torch.tensor([0, 4]))
    torch.testing.assert_close(out.reshape(2, 4, 8), stack(torch.tensor([1, 0])))


def test_lora_runs_share_one_backbone_and_leave_it_untouched(tmp_path, small_backbone):
    tr = _trainer(tmp_path, small_backbone, baselines=["lora"])
    tr.targets = tr.targets[:1]
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    ptrs = {n: p.data_ptr() for n, p in tr.model.named_parameters()}
    from peft import get_peft_model

    from mptkern.train.trainer import IDLE_ADAPTER

    peft_model = get_peft_model(tr.model, tr._lora_config(), adapter_name=IDLE_ADAPTER)
    sizes = []
    runs = [r for r in tr.target_runs() if r.method == "lora" and r.k]
    for run in runs:
        row = tr.train_lora(run, peft_model)
        assert row["params"] == tr._lora_size() and 0.0 <= row["score"] <= 1.0
        sizes.append(sum(p.numel() * p.element_size() for p in peft_model.parameters()))
        assert (tmp_path / "adapters" / run.name / "adapter_model.safetensors").exists()
    assert len(set(sizes)) == 1, sizes  # flat: each run's adapter is gone before the next one
    peft_model.unload()
    assert {n: p.data_ptr() for n, p in tr.model.named_parameters()} == ptrs  # no copy of the backbone
    for n, p in tr.model.named_parameters():
        assert torch.equal(p, before[n]), n  # evaluation did not merge into the frozen weights


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_teacher_cache_gives_the_losses_of_recomputing(tmp_path, small_backbone, mode):
    losses = {}
    for cache in ("off", mode):
        tr = _trainer(tmp_path / cache, small_backbone)
        tr.config.distill_loss.teacher_cache = cache
        torch.manual_seed(0)
        teachers = TaskPrompts(len(tr.sources), 4, tr.hidden, init_std=0.5)
        tr.distill(teachers)
        losses[cache] = load_checkpoint(tmp_path / cache / "distill.ckpt")["losses"]
    torch.testing.assert_close(torch.tensor(losses[mode]), torch.tensor(losses["off"]), rtol=1e-5, atol=1e-6)
    if mode == "disk":
        assert list((tmp_path / "disk" / "teacher_cache").glob("shard-*.safetensors"))


@pytest.mark.parametrize("make", [tiny_models.tiny_llama, tiny_models.tiny_gpt_oss], ids=["llama", "gpt-oss"])
def test_engine_evaluation_equals_the_hf_generate_path(make, monkeypatch):
    """The engine against what the trainer's evaluation did before it (kept as bench_recipe's baseline)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    from bench_recipe import hf_texts

    suite = make_suite(seed=0, n_train=2, n_eval=4)
    tok = word_tokenizer(suite, bos=True)
    model = make(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.generation_config.eos_token_id = tok.eos_token_id
    torch.manual_seed(1)
    targets = suite["targets"][:3]
    prompts = MultitaskPrompt(len(targets), 5, model.config.hidden_size, task_names=[t.name for t in targets])
    with torch.no_grad():
        prompts.prompt_embeddings.normal_(0, 1)
    runs = [EvalRun(f"run-{t.name}", t, (prompts, i)) for i, t in enumerate(targets)]
    runs.append(EvalRun("plain", targets[0], None))  # a model evaluated as it is (e.g. LoRA): no prompt
    got = evaluate_runs(model, tok, runs, max_new_tokens=6, progress=False)
    sliding = getattr(model.config, "sliding_window", None) is not None
    for run in runs:
        # gpt-oss one request per batch: HF's sliding window counts left-padding columns between the
        # prompt and the input, so padded HF batches see fewer prompt rows than the model would alone
        budget = generation_budget(InputFormat(tok), run.task, 6)
        texts = hf_texts(model, tok, run.prompt, run.task, max_new_tokens=budget, batch_size=1 if sliding else 3,
                         max_length=256)
        assert got[run.name]["texts"] == texts, run.name
        assert got[run.name]["score"] == score(run.task, texts, run.task.eval)["score"]
    assert any(t.strip() for r in runs for t in got[r.name]["texts"])  # not all empty


def test_run_validation():
    task = make_suite(seed=0, n_train=3, n_eval=1)["targets"][0]
    with pytest.raises(ValueError, match="unknown method"):
        Run(task, 1, 0, "adapter")
    with pytest.raises(ValueError, match="outside"):
        Run(task, 4, 0, "mpt")
    run = Run(task, 2, 0, "mpt")
    assert run.batch(0, 0, 8) == run.batch(0, 0, 8) and len(run.batch(0, 0, 8)) == 2
    assert run.train_examples() == Run(task, 2, 0, "lora").train_examples()  # the same k examples per method


def test_a_crashed_grid_resumes_where_it_stopped(tmp_path, small_backbone, monkeypatch):
    def grid(out):
        tr = _trainer(out, small_backbone)
        tr.targets = tr.targets[:1]
        student = _student(tr)
        runs = [r for r in tr.target_runs() if r.method in PROMPT_METHODS and r.k]
        return tr.train_prompt_grid(runs, [tr.target_prompt(r, student) for r in runs])

    full = grid(tmp_path / "full")

    class Crash(Exception):
        pass

    real_log = MPTTrainer._log

    def crash_at_step_3(self, record):  # after step 3's update, before its checkpoint (every 2)
        real_log(self, record)
        if record.get("stage") == "targets-grid" and record["step"] == 3:
            raise Crash

    monkeypatch.setattr(MPTTrainer, "_log", crash_at_step_3)
    with pytest.raises(Crash):
        grid(tmp_path / "cut")
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "cut" / "targets-grid.ckpt")["step"] == 2
    resumed = grid(tmp_path / "cut")
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
