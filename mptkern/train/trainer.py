"""MPTTrainer: single-task teachers -> distillation into a decomposed prompt -> target adaptation.

Every stage trains prompt parameters only, on a frozen backbone, through ``PromptedLM`` (each
task's prompt computed once per batch). Batches are a pure function of ``(seed, stage, step)``, so a
stage resumed from its checkpoint continues exactly as an uninterrupted run would. Checkpoints are
written atomically; every logged step goes to ``<output_dir>/log.jsonl``.

Example::

    from mptkern.train import MPTTrainer, TrainConfig
    trainer = MPTTrainer(TrainConfig(output_dir="runs/demo"))
    results = trainer.run()            # teachers, distillation, targets + baselines
    print(trainer.format_results(results))
"""

from __future__ import annotations

import copy
import csv
import json
import zlib
import math
import random
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mptkern.data import Collator, GenerationCollator, MixedTaskSampler, TaskSubsetSampler, flatten, make_suite, task_sizes
from mptkern.eval import score
from mptkern.models import PromptedLM, concat_prompt
from mptkern.ops import fused_distill_loss
from mptkern.prompts import MultitaskPrompt, TaskPrompts
from mptkern.train.checkpoint import load_checkpoint, save_checkpoint
from mptkern.train.config import StageConfig, TrainConfig


def _batches(sampler, steps: int, per_step: int) -> list[list[int]]:
    """The first ``steps * per_step`` batches of a sampler, epoch after epoch, as a fixed list."""
    out, epoch = [], 0
    while len(out) < steps * per_step:
        sampler.set_epoch(epoch)
        out.extend(list(sampler))
        epoch += 1
    return out[: steps * per_step]


def _plain_distill_loss(h_s, h_t, weight, labels, *, temperature, kl_weight, ce_weight, hidden_weight):
    """The distillation objective written plainly with full logits: the reference for the fused path."""
    z_s, z_t = (h_s @ weight.t()).float(), (h_t @ weight.t()).float()
    log_ps, log_pt = torch.log_softmax(z_s / temperature, -1), torch.log_softmax(z_t / temperature, -1)
    kl = temperature**2 * (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    ce = torch.nn.functional.cross_entropy(z_s, labels, reduction="none")
    mse = (h_s.float() - h_t.float()).square().mean(-1)
    return (kl_weight * kl + ce_weight * ce + hidden_weight * mse).mean()


def _schedule(cfg: StageConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.schedule == "linear":
            return max(0.0, 1 - progress)
        raise ValueError(f"schedule must be linear, cosine or constant, got {cfg.schedule!r}")

    return factor


class MPTTrainer:
    """The MPT recipe on one frozen causal LM.

    Args:
        config: a :class:`TrainConfig`.
        model, tokenizer: a loaded backbone; by default ``config.model`` is loaded
            ("default": the embedded SmolLM2, else a local Hugging Face folder).
        suite: ``{"sources": [Task], "targets": [Task]}``; by default the synthetic suite, or the
            registry named in ``config.data``.
    """

    def __init__(self, config: TrainConfig, model=None, tokenizer=None, suite=None):
        self.config = config
        cuda = torch.cuda.is_available()
        self.device = torch.device(("cuda" if cuda else "cpu") if config.device == "auto" else config.device)
        self.dtype = {"auto": torch.bfloat16 if self.device.type == "cuda" else torch.float32,
                      "float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
        if model is None:
            model, tokenizer = self._load_model()
        self.model, self.tokenizer = model.to(self.device), tokenizer
        self.model.requires_grad_(False).eval()
        self.suite = suite if suite is not None else self._load_suite()
        self.sources, self.targets = self.suite["sources"], self.suite["targets"]
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.hidden = self.model.config.hidden_size
        # data parallel under torchrun: each rank runs its share of every step's micro-batches and
        # only the prompt (trainable) gradients are all-reduced
        dist = torch.distributed
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world > 1 else 0
        self._stage_bar = None  # the target stage's bar, while it runs
        self.stage_seconds: dict[str, float] = {}  # wall seconds per stage of the last run()

    # ------------------------------------------------------------------ setup
    def _load_model(self):
        from mptkern.models import load_default

        if self.config.model == "default":
            return load_default(dtype=self.dtype, device=self.device)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.config.model, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(self.config.model, dtype=self.dtype, local_files_only=True)
        return model, tok

    def _load_suite(self):
        d = self.config.data
        if d.registry:
            from mptkern.data import load_registry

            return load_registry(d.registry, d.data_root or ".", seed=d.synthetic_seed)
        return make_suite(seed=d.synthetic_seed, n_train=d.n_train, n_eval=d.n_eval)

    def _collator(self, tasks):
        return Collator(self.tokenizer, {t.name: i for i, t in enumerate(tasks)}, max_length=256)

    def _seed(self, name: str) -> None:
        """Seed torch for the random initialisation of ``name``: runs are a function of the config."""
        torch.manual_seed(zlib.crc32(f"{self.config.seed}-{name}".encode()))

    def _batch(self, collate, examples, indices=None) -> dict:
        """Collate ``examples`` (or ``examples[i]`` for ``i`` in ``indices``) onto the trainer's device."""
        chosen = examples if indices is None else [examples[i] for i in indices]
        return {k: v.to(self.device) for k, v in collate(chosen).items()}

    def _micro(self, cfg: StageConfig) -> int:
        """Micro-batches per optimiser step over all ranks: the same data whatever the world size."""
        return cfg.grad_accum * self.world

    def _lm(self, prompt) -> PromptedLM:
        return PromptedLM(self.model, prompt, share_prefix=self.config.fused)

    def _log(self, record: dict) -> None:
        if self.rank:
            return
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _text_init(self, prompt: TaskPrompts, task, index: int) -> None:
        """Start task ``index``'s prompt from the embeddings of the task's instruction (PEFT's TEXT init)."""
        ids = self.tokenizer(task.instruction, add_special_tokens=False)["input_ids"]
        prompt.init_from_text(self.model.get_input_embeddings(), ids, task=index)

    # ------------------------------------------------------------------ the loop
    def _train(self, name: str, module: torch.nn.Module, cfg: StageConfig, step_loss, params=None) -> list[float]:
        """Run ``cfg.steps`` optimiser steps of ``step_loss(step, micro) -> loss``; resumes from and
        writes ``<output_dir>/<name>.ckpt``. Returns the per-step losses."""
        params = [p for p in (params or module.parameters()) if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
        ckpt_path, start, losses = self.out / f"{name}.ckpt", 0, []
        state = load_checkpoint(ckpt_path)
        if state is not None:  # only trainable tensors are saved: a LoRA model's frozen base is not
            unexpected = module.load_state_dict(state["params"], strict=False).unexpected_keys
            if unexpected or set(state["params"]) != {n for n, p in module.named_parameters() if p.requires_grad}:
                raise RuntimeError(f"{ckpt_path} does not match this stage's parameters (unexpected: {unexpected})")
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start, losses = state["step"], state["losses"]

        def checkpoint(step):
            if self.rank == 0:
                trainable = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
                save_checkpoint(ckpt_path, dict(params=trainable, optimizer=opt.state_dict(),
                                                scheduler=sched.state_dict(), step=step, losses=losses))
            if self.world > 1:
                torch.distributed.barrier()

        # one bar per stage: a stage of one run (teachers, distillation) shows its steps; the target
        # stage shows its runs and names the current one (self._stage_bar, set by adapt_targets)
        stage_bar = self._stage_bar
        bar = None if stage_bar is not None else tqdm(desc=name, unit="step", initial=start, total=cfg.steps,
                                                      disable=self.rank != 0)
        t0, tokens, micros = time.perf_counter(), 0, self._micro(cfg)
        for step in range(start, cfg.steps):
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            for micro in range(self.rank, micros, self.world):
                loss, n_tok = step_loss(step, micro)
                (loss / micros).backward()
                total += loss.detach().double() / micros
                tokens += n_tok
            if self.world > 1:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    torch.distributed.all_reduce(p.grad)
                torch.distributed.all_reduce(total)
            total = float(total)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(total)
            rate = tokens / (time.perf_counter() - t0)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{rate:.0f}")
            else:
                stage_bar.set_postfix(run=name, step=f"{step + 1}/{cfg.steps}", loss=f"{total:.3f}")
            self._log(dict(stage=name, step=step + 1, loss=total, lr=sched.get_last_lr()[0], tokens_per_s=rate))
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                checkpoint(step + 1)
        if bar is not None:
            bar.close()
        return losses

    # ------------------------------------------------------------------ stage 1
    def train_teachers(self) -> TaskPrompts:
        """One free prompt per source task, all trained together with batches mixing tasks."""
        cfg, tasks = self.config.teachers, self.sources
        self._seed("teachers")
        teachers = TaskPrompts(len(tasks), self.config.prompt_len, self.hidden, task_names=[t.name for t in tasks])
        for i, t in enumerate(tasks):
            self._text_init(teachers, t, i)
        teachers.to(self.device, self.dtype)
        lm, collate, examples = self._lm(teachers), self._collator(tasks), flatten(tasks)
        sampler = MixedTaskSampler(task_sizes(tasks), cfg.batch_size, seed=self.config.seed)
        batches = _batches(sampler, cfg.steps, self._micro(cfg))

        def step_loss(step, micro):
            b = self._batch(collate, examples, batches[step * self._micro(cfg) + micro])
            out = lm(b["input_ids"], b["attention_mask"], b["task_ids"], b["labels"], return_logits=False)
            return out.loss, int(b["attention_mask"].sum())

        self._train("teachers", teachers, cfg, step_loss)
        return teachers

    # ------------------------------------------------------------------ stage 2
    def distill(self, teachers: TaskPrompts) -> MultitaskPrompt:
        """The decomposed student, trained on a random subset of source tasks per batch against the
        teachers through the same frozen backbone: CE + T^2 KL + hidden MSE at the target positions,
        by ``fused_distill_loss`` (no logits tensor)."""
        cfg, loss_cfg, tasks = self.config.distill, self.config.distill_loss, self.sources
        self._seed("distill")
        student = MultitaskPrompt(len(tasks), self.config.prompt_len, self.hidden, rank=self.config.rank,
                                  task_names=[t.name for t in tasks])
        with torch.no_grad():  # P* starts at the teachers' mean; U V near ones, so every task starts there
            student.prompt_embeddings.copy_(teachers.prompts.float().mean(0))
        student.to(self.device, self.dtype)
        teachers.requires_grad_(False)
        s_lm, t_lm = self._lm(student), self._lm(teachers)
        collate, examples = self._collator(tasks), flatten(tasks)
        sampler = TaskSubsetSampler(task_sizes(tasks), cfg.batch_size, seed=self.config.seed + 1, min_tasks=loss_cfg.min_tasks)
        batches = _batches(sampler, cfg.steps, self._micro(cfg))
        head = self.model.lm_head.weight

        def step_loss(step, micro):
            b = self._batch(collate, examples, batches[step * self._micro(cfg) + micro])
            args = (b["input_ids"], b["attention_mask"], b["task_ids"])
            with torch.no_grad():
                t_out = t_lm(*args, return_logits=False)
            s_out = s_lm(*args, return_logits=False)
            valid = b["labels"] != -100
            h_s, h_t, labels = s_out.predictor_hidden[valid], t_out.predictor_hidden[valid], b["labels"][valid]
            weights = dict(temperature=loss_cfg.temperature, kl_weight=loss_cfg.kl_weight,
                           ce_weight=loss_cfg.ce_weight, hidden_weight=loss_cfg.hidden_weight)
            loss = (fused_distill_loss(h_s, h_t, head, labels, **weights) if self.config.fused
                    else _plain_distill_loss(h_s, h_t, head, labels, **weights))
            return loss, int(b["attention_mask"].sum())

        self._train("distill", student, cfg, step_loss)
        return student

    # ------------------------------------------------------------------ stage 3
    def _fit(self, name: str, module, task, train, *, lora_model=None) -> None:
        """Train ``module`` (a prompt, or the LoRA-wrapped model) on the k examples ``train``."""
        cfg = self.config.target
        collate = self._collator([task])
        lm = None if lora_model is not None else self._lm(module)

        def step_loss(step, micro):
            rng = random.Random(f"{name}-{step}-{micro}")
            b = self._batch(collate, [rng.choice(train) for _ in range(min(cfg.batch_size, len(train)))])
            if lora_model is not None:
                loss = lora_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
            else:
                loss = lm(b["input_ids"], b["attention_mask"], b["task_ids"], b["labels"], return_logits=False).loss
            return loss, int(b["attention_mask"].sum())

        self._train(name, module, cfg, step_loss)

    @torch.no_grad()
    def evaluate(self, prompt, task, *, model=None) -> dict:
        """Batched greedy generation on ``task.eval``, parsed and scored with the task's metric.
        ``prompt``: a one-task prompt module (prepended to every row) or None (``model`` as is)."""
        model = model if model is not None else self.model
        tok = self.tokenizer
        gen = GenerationCollator(tok, {task.name: 0}, max_length=256)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        texts = []
        for i in range(0, len(task.eval), self.config.eval_batch_size):
            b = self._batch(gen, task.eval[i : i + self.config.eval_batch_size])
            kwargs = dict(max_new_tokens=self.config.max_new_tokens, do_sample=False, pad_token_id=pad,
                          eos_token_id=tok.eos_token_id)
            if prompt is None:
                out = model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **kwargs)
                out = out[:, b["input_ids"].shape[1]:]
            else:
                # PEFT's layout: prompt rows first, then the left-padded input; positions follow the mask
                embeds, mask = concat_prompt(prompt(b["task_ids"]), model.get_input_embeddings()(b["input_ids"]),
                                             b["attention_mask"])
                out = model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
            texts += tok.batch_decode(out, skip_special_tokens=True)
        return score(task, texts, task.eval)

    def adapt_targets(self, student: MultitaskPrompt) -> list[dict]:
        """Each held-out target, k-shot for every k and seed: MPT initialised from the student, and the
        baselines (single-task prompt tuning from the instruction's embeddings; LoRA via peft)."""
        cfg, results = self.config.target_init, []
        runs = [(task, k, seed, method) for task in self.targets for k in cfg.shots
                for seed in (cfg.seeds if k else cfg.seeds[:1]) for method in ["mpt", *self.config.baselines]]
        self._stage_bar = tqdm(total=len(runs), desc="targets", unit="run", disable=self.rank != 0)
        try:
            for task, k, seed, method in runs:
                self._stage_bar.set_postfix(run=f"{task.name}-k{k}-s{seed}-{method}")
                train = random.Random(f"{seed}-{task.name}").sample(task.train, k)
                res = self._adapt_one(method, student, task, train, k, seed)
                results.append(res)
                self._log(dict(stage="target", **res))
                self._stage_bar.update(1)
        finally:
            self._stage_bar.close()
            self._stage_bar = None
        return results

    def _adapt_one(self, method, student, task, train, k, seed) -> dict:
        name = f"target-{task.name}-k{k}-s{seed}-{method}"
        self._seed(name)
        if method == "mpt":
            prompt = MultitaskPrompt.from_source(student, self.config.target_init.init, num_tasks=1, task_names=[task.name])
            params = sum(p.numel() for p in prompt.parameters())
            if k:
                self._fit(name, prompt, task, train)
            res = self.evaluate(prompt, task)
        elif method == "prompt_tuning":
            prompt = TaskPrompts(1, self.config.prompt_len, self.hidden, task_names=[task.name])
            self._text_init(prompt, task, 0)
            prompt.to(self.device, self.dtype)
            params = sum(p.numel() for p in prompt.parameters())
            if k:
                self._fit(name, prompt, task, train)
            res = self.evaluate(prompt, task)
        elif method == "lora":
            from peft import LoraConfig, get_peft_model

            lora = get_peft_model(copy.deepcopy(self.model), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                        target_modules=["q_proj", "v_proj"]))
            params = sum(p.numel() for p in lora.parameters() if p.requires_grad)
            if k:
                self._fit(name, lora, task, train, lora_model=lora)
            res = self.evaluate(None, task, model=lora)
        else:
            raise ValueError(f"unknown method {method!r}; methods: mpt, prompt_tuning, lora")
        return dict(task=task.name, method=method, k=k, seed=seed, params=params, metric=res["metric"], score=res["score"])

    # ------------------------------------------------------------------ all
    def run(self) -> list[dict]:
        """Teachers -> distillation -> targets; exports the student as a PEFT adapter; returns the
        per-(target, method, k, seed) results (also written to ``results.json`` and ``results.csv``);
        ``stage_seconds`` holds each stage's wall time."""
        timed = self.stage_seconds = {}
        t0 = time.perf_counter()
        teachers = self.train_teachers()
        timed["teachers"], t0 = time.perf_counter() - t0, time.perf_counter()
        student = self.distill(teachers)
        if self.rank == 0:
            student.to_peft(self.out / "student_adapter")
        timed["distill"], t0 = time.perf_counter() - t0, time.perf_counter()
        results = self.adapt_targets(student)
        timed["targets"] = time.perf_counter() - t0
        if self.rank == 0:
            (self.out / "results.json").write_text(json.dumps(results, indent=1))
            with open(self.out / "results.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(results[0]) if results else ["task"])
                writer.writeheader()
                writer.writerows(results)
        return results

    @staticmethod
    def format_results(results: list[dict]) -> str:
        """A table: per target and k, each method's mean score (and spread over seeds) and parameters."""
        groups: dict[tuple, list[dict]] = {}
        for r in results:
            groups.setdefault((r["task"], r["k"], r["method"]), []).append(r)
        lines = [f"{'target':<20} {'k':>3} {'method':<14} {'metric':<9} {'score':>14} {'trainable':>10}"]
        for (task, k, method), rs in groups.items():
            vals = [r["score"] for r in rs]
            spread = f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""
            lines.append(f"{task:<20} {k:>3} {method:<14} {rs[0]['metric']:<9} {statistics.mean(vals):>7.3f}{spread:<7} "
                         f"{rs[0]['params']:>10,}")
        return "\n".join(lines)
