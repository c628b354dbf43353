"""Data-parallel training: two gloo processes on CPU equal one process accumulating both shares."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mptkern.prompts import TaskPrompts
from mptkern.train import DataConfig, MPTTrainer, StageConfig, TargetConfig, TrainConfig
from mptkern.train.evaluation import EvalRun, evaluate_runs
from tests.tiny_models import small_smollm


def _config(out, grad_accum):
    stage = StageConfig(steps=3, batch_size=2, grad_accum=grad_accum, warmup_steps=0)
    return TrainConfig(output_dir=str(out), prompt_len=4, data=DataConfig(n_train=8, n_eval=2), teachers=stage,
                       distill=stage, target=stage, target_init=TargetConfig(shots=[2], seeds=[0]))


def _eval_runs(trainer, teachers):
    return [EvalRun(t.name, t, (teachers, i)) for i, t in enumerate(trainer.sources[:3])]


def _worker(rank, world, port, out, cache):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, tok = small_smollm(cache)
        trainer = MPTTrainer(_config(out, grad_accum=1), model=model, tokenizer=tok)
        assert trainer.world == 2 and trainer.rank == rank
        teachers = trainer.train_teachers()
        torch.save(teachers.prompts.detach(), f"{out}/rank{rank}.pt")
        scores = evaluate_runs(trainer.model, tok, _eval_runs(trainer, teachers), max_new_tokens=4, progress=False)
        torch.save({name: res["texts"] for name, res in scores.items()}, f"{out}/eval{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process_with_accumulation(tmp_path):
    cache = tmp_path / "cache"
    single = MPTTrainer(_config(tmp_path / "single", grad_accum=2), *small_smollm(cache)).train_teachers().prompts.detach()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "ddp").mkdir()
    mp.spawn(_worker, args=(2, port, str(tmp_path / "ddp"), str(cache)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0, r1)  # every rank holds the same prompts
    # Summation order differs (all-reduce vs local accumulation). Adam divides by sqrt(v), so an entry
    # whose gradient is zero up to rounding can move by up to ~lr = 3e-2 either way: a handful of
    # entries may differ; every other entry must agree to 2e-4.
    far = lambda a, b: ((a - b).abs() > 2e-4).float().mean().item()  # noqa: E731 -- fraction of entries apart
    assert far(r0, single) < 1e-3, far(r0, single)
    assert (r0 - single).abs().max() < 0.1
    half = MPTTrainer(_config(tmp_path / "half", grad_accum=1), *small_smollm(cache)).train_teachers().prompts.detach()
    assert far(half, single) > 0.1  # half the data per step: the criterion above tells it apart
    log = (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()
    assert len(log) == 3  # rank 0 logs, rank 1 does not
    # evaluation: each rank generated half of the requests; both hold every text, as one process would
    e0, e1 = (torch.load(tmp_path / "ddp" / f"eval{r}.pt") for r in (0, 1))
    tr = MPTTrainer(_config(tmp_path / "eval", grad_accum=1), *small_smollm(cache))
    teachers = TaskPrompts(len(tr.sources), 4, tr.hidden, task_names=[t.name for t in tr.sources])
    with torch.no_grad():
        teachers.prompts.copy_(r0)
    alone = evaluate_runs(tr.model, tr.tokenizer, _eval_runs(tr, teachers), max_new_tokens=4, progress=False)
    assert e0 == e1 == {name: res["texts"] for name, res in alone.items()}
