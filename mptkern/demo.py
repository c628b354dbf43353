"""`mptkern demo`: the whole MPT recipe on the embedded SmolLM2 and the synthetic clinical suite.

Teachers for the 14 synthetic source tasks, distillation into one decomposed prompt, then each of
the 5 held-out target tasks adapted k-shot from it, against single-task prompt tuning and LoRA on
the same examples, 64 eval examples per target, 3 seeds for k > 0. On a GPU the larger preset runs
(bf16, Triton kernels). The data is synthetic (``mptkern.data.synthetic``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from mptkern import backends
from mptkern.data.lengths import format_length_report
from mptkern.train import DataConfig, MPTTrainer, StageConfig, TargetConfig, TrainConfig


def demo_config(output_dir: str = "runs/demo", device: str = "auto") -> TrainConfig:
    """The demo preset: small on CPU, larger on a GPU. The backbone runs in bfloat16 on a GPU and on
    a CPU with bf16 dot-product instructions (:func:`mptkern.backends.cpu_bf16_native`), else in
    float32; the trained prompts are float32 either way."""
    gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if gpu:
        return TrainConfig(output_dir=output_dir, device=device, prompt_len=32, max_new_tokens=96,
                           data=DataConfig(n_train=256, n_eval=64),
                           teachers=StageConfig(steps=300, batch_size=32), distill=StageConfig(steps=300, batch_size=32),
                           target=StageConfig(steps=60, batch_size=8, warmup_steps=5),
                           target_init=TargetConfig(shots=[0, 5, 20], seeds=[0, 1, 2]))
    # bfloat16 where the CPU multiplies it natively (4x float32's matmul speed there), else float32
    dtype = "bfloat16" if backends.cpu_bf16_native() else "float32"
    return TrainConfig(output_dir=output_dir, device=device, dtype=dtype, prompt_len=8, max_new_tokens=48, eval_batch_size=8,
                       data=DataConfig(n_train=32, n_eval=64),
                       teachers=StageConfig(steps=30, batch_size=8, lr=3e-2, warmup_steps=3),
                       distill=StageConfig(steps=30, batch_size=8, lr=3e-2, warmup_steps=3),
                       target=StageConfig(steps=8, batch_size=2, lr=3e-2, warmup_steps=1),
                       target_init=TargetConfig(shots=[0, 8], seeds=[0, 1, 2]))


def run(config: TrainConfig, announce: Callable[[str], None] | None = None) -> str:
    """Run the recipe with ``config``; returns the printed report: the results table, the time of
    the whole run and of each stage, and where the log, checkpoints, results and adapter went.
    ``mptkern demo`` and ``mptkern train`` print it. ``announce``, when given, receives the token
    length report of the loaded data (:func:`mptkern.data.lengths.format_length_report`) before
    training starts."""
    t0 = time.perf_counter()
    trainer = MPTTrainer(config)
    load = time.perf_counter() - t0
    if announce is not None:
        announce(format_length_report(trainer.data_report, config.max_length))
    results = trainer.run()
    total = time.perf_counter() - t0
    frozen = sum(p.numel() for p in trainer.model.parameters())
    mpt = next(r["params"] for r in results if r["method"] == "mpt")
    out = trainer.out.resolve()
    stages = {"model and data": load, **trainer.stage_seconds}
    data = "synthetic" if not config.data.registry else f"registry {config.data.registry!r}"
    sizes = sorted({len(t.eval) for t in trainer.targets})
    n_eval = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    head = [
        f"MPT on {type(trainer.model).__name__} ({frozen:,} frozen parameters), {trainer.device.type}, "
        f"{str(trainer.dtype).removeprefix('torch.')}, "
        f"{len(trainer.sources)} {data} source tasks -> {len(trainer.targets)} held-out targets",
        f"per target, MPT trains {mpt:,} parameters ({100 * mpt / frozen:.4f}% of the model); "
        f"prompt length {config.prompt_len}, rank {config.rank}",
        f"scores on {n_eval} held-out examples per target by greedy generation "
        f"(micro F1 / accuracy / ROUGE-L); k = training examples; mean ± std over seeds",
        "",
    ]
    runs = trainer.target_runs()
    trained = [r for r in runs if r.k]
    budget = [
        f"teachers {config.teachers.steps} steps x {config.teachers.batch_size} examples",
        f"distillation {config.distill.steps} steps x {config.distill.batch_size} "
        f"(teacher cache: {config.distill_loss.teacher_cache} -> {trainer.teacher_cache_mode})",
        f"targets {len(runs)} runs: {sum(r.method != 'lora' for r in trained)} prompt runs in one stream and "
        f"{sum(r.method == 'lora' for r in trained)} LoRA runs, {config.target.steps} steps x up to "
        f"{config.target.batch_size} each; {sum(len(r.task.eval) for r in runs)} eval requests",
    ]
    tail = [
        "",
        "budget: " + "; ".join(budget),
        f"time: {total:.0f} s in all; " + ", ".join(f"{name} {sec:.0f} s" for name, sec in stages.items()),
        f"log:             {out / 'log.jsonl'}",
        f"checkpoints:     {out}/*.ckpt",
        f"results:         {out / 'results.csv'}, {out / 'results.json'}, plot {out / 'results.png'}",
        f"student adapter: {out / 'student_adapter'} (PEFT format; mptkern eval --adapter / mptkern serve --adapter)",
        f"target adapters: {out / 'adapters'} (every trained MPT and prompt-tuning prompt, every LoRA run)",
    ]
    return "\n".join(head) + MPTTrainer.format_results(results) + "\n" + "\n".join(tail)


def quick_config(output_dir: str) -> TrainConfig:
    """A seconds-long configuration for smoke tests: every stage and method runs once."""
    cfg = demo_config(output_dir, device="cpu")
    tiny = StageConfig(steps=2, batch_size=2, warmup_steps=0)
    return dataclasses.replace(cfg, prompt_len=4, max_new_tokens=4, data=DataConfig(n_train=4, n_eval=2),
                               teachers=tiny, distill=tiny, target=tiny,
                               target_init=TargetConfig(shots=[0, 2], seeds=[0]))
