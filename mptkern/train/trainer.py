"""MPTTrainer: single-task teachers -> distillation into a decomposed prompt -> target adaptation.

Every stage trains prompt parameters only, on a frozen backbone, through ``PromptedLM`` (each
task's prompt computed once per batch). The prompts are float32 parameters whatever the backbone's
dtype; their rows are cast to it as they enter the model. Batches are a pure function of ``(seed,
stage, step)``, so a stage resumed from its checkpoint continues exactly as an uninterrupted run
would. Checkpoints are written atomically and record the config's fingerprint: a stage resumes only
under the config that wrote its checkpoint (:func:`mptkern.train.config.config_fingerprint` lists the keys that may
change). Every logged step goes to ``<output_dir>/log.jsonl``.

Example::

    from mptkern.train import MPTTrainer, TrainConfig
    trainer = MPTTrainer(TrainConfig(output_dir="runs/demo"))
    results = trainer.run()            # teachers, distillation, targets + baselines
    print(trainer.format_results(results))
"""

from __future__ import annotations

import json
import math
import time
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

from mptkern.data import Collator, InputFormat, MixedTaskSampler, TaskSubsetSampler, flatten, make_suite, task_sizes
from mptkern.data.lengths import fit_to_length
from mptkern.models import PromptedLM
from mptkern.prompts import MultitaskPrompt, TaskPrompts
from mptkern.train.checkpoint import load_checkpoint, save_checkpoint
from mptkern.train.config import StageConfig, TrainConfig, config_fingerprint
from mptkern.train.evaluation import EvalRun, evaluate_runs
from mptkern.train.grid import PROMPT_METHODS, PromptStack, Run, per_run_mean
from mptkern.train.report import format_results, plot_results, write_results
from mptkern.train.teacher_cache import build_teacher_cache


# trainable prompts stay float32 whatever the backbone's dtype, as PEFT keeps LoRA weights
# (autocast_adapter_dtype): bf16 rounding (8 mantissa bits) would drop AdamW's small late updates
PROMPT_DTYPE = torch.float32
IDLE_ADAPTER = "idle"  # the shared PeftModel's adapter between LoRA runs (PEFT needs one to exist)


def backbone_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype of a config's ``dtype`` on ``device``: ``auto`` is bfloat16 on CUDA and
    float32 elsewhere."""
    choices = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
               "float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in choices:
        raise ValueError(f"dtype must be one of {sorted(choices)}, got {name!r}")
    return choices[name]


def _batches(sampler, steps: int, per_step: int) -> list[list[int]]:
    """The first ``steps * per_step`` batches of a sampler, epoch after epoch, as a fixed list."""
    out, epoch = [], 0
    while len(out) < steps * per_step:
        sampler.set_epoch(epoch)
        out.extend(list(sampler))
        epoch += 1
    return out[: steps * per_step]


def _plain_distill_loss(h_s, h_t, weight, labels, *, temperature, kl_weight, ce_weight, hidden_weight, logit_softcap=None):
    """The distillation objective written plainly with full logits: the reference for the fused path."""
    z_s, z_t = (h_s @ weight.t()).float(), (h_t @ weight.t()).float()
    if logit_softcap is not None:
        z_s, z_t = (logit_softcap * torch.tanh(z / logit_softcap) for z in (z_s, z_t))
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
        self.dtype = backbone_dtype(config.dtype, self.device)
        if model is None:
            model, tokenizer = self._load_model()
        else:  # a given model runs in its own dtype; an explicit config dtype must agree with it
            given = next(model.parameters()).dtype
            if config.dtype != "auto" and given != self.dtype:
                raise ValueError(f"config dtype {config.dtype!r} but the given model's parameters are {given}; "
                                 f"load the model in {self.dtype} or set dtype: auto")
            self.dtype = given
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
        self.data_report = self._fit_data()  # per task: token lengths, inputs cut, examples dropped
        self._stage_bar = None  # the target stage's bar, while it runs
        self.stage_seconds: dict[str, float] = {}  # wall seconds per stage of the last run()
        self.teacher_cache_mode: str | None = None  # what distill() used: memory, disk or off

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

            return load_registry(d.registry, d.data_root or ".", names=d.tasks, seed=d.synthetic_seed,
                                 limit=d.limit, eval_limit=d.eval_limit)
        return make_suite(seed=d.synthetic_seed, n_train=d.n_train, n_eval=d.n_eval)

    def _fit_data(self) -> dict[str, dict]:
        """Fit every task to ``config.max_length`` (drop training examples whose answer alone does not
        fit: answers are never cut) and measure it: ``{task: fit_to_length's report}``, also
        written to ``<output_dir>/data.json`` with the ``max_length`` it was measured at."""
        fmt, limit, report = InputFormat(self.tokenizer), self.config.max_length, {}
        for task in self.sources + self.targets:
            report[task.name] = fit_to_length(task, fmt, limit)
            if not task.train and task in self.sources:
                raise ValueError(f"source task {task.name!r} has no training example whose answer fits in "
                                 f"max_length={limit}; raise max_length")
        if self.rank == 0:
            (self.out / "data.json").write_text(json.dumps({"max_length": limit, "tasks": report}, indent=1) + "\n")
        return report

    def _collator(self, tasks):
        return Collator(self.tokenizer, {t.name: i for i, t in enumerate(tasks)}, max_length=self.config.max_length)

    def _fingerprint(self) -> dict:
        """The config's fingerprint, with the dtype ``"auto"`` resolved to (weights differ by dtype)."""
        return config_fingerprint(self.config, dtype=str(self.dtype).removeprefix("torch."))

    def _resume_state(self, path: Path) -> dict | None:
        """The checkpoint at ``path``, or None; a ValueError when a different config wrote it."""
        return load_checkpoint(path, fingerprint=self._fingerprint())

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
    def _train(self, name: str, module: torch.nn.Module, cfg: StageConfig, step_loss, groups=None) -> list:
        """Run ``cfg.steps`` optimiser steps of ``step_loss(step, micro) -> (loss, tokens)``; resumes
        from and writes ``<output_dir>/<name>.ckpt``.

        ``groups``: lists of parameters trained as independent runs (default: one run, the module's
        trainable parameters). Each run is its own AdamW parameter group with its own gradient
        clipping; ``loss`` is then ``(runs,)``, each run's own loss, and the sum is minimised. Returns
        the per-step losses (a float per step, or a list of per-run floats with several groups)."""
        grid = groups is not None
        groups = [[p for p in g if p.requires_grad] for g in (groups or [module.parameters()])]
        params = [p for g in groups for p in g]
        opt = torch.optim.AdamW([{"params": g} for g in groups], lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
        ckpt_path, start, losses = self.out / f"{name}.ckpt", 0, []
        state = self._resume_state(ckpt_path)
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
                                                scheduler=sched.state_dict(), step=step, losses=losses,
                                                fingerprint=self._fingerprint()))
            if self.world > 1:
                torch.distributed.barrier()

        # one bar per stage: a stage of one run (teachers, distillation) shows its steps; the LoRA
        # runs of the target stage show on the stage's bar (self._stage_bar, set by adapt_targets)
        stage_bar = self._stage_bar
        bar = None if stage_bar is not None else tqdm(desc=name, unit="step", initial=start, total=cfg.steps,
                                                      disable=self.rank != 0)
        t0, tokens, micros = time.perf_counter(), 0, self._micro(cfg)
        for step in range(start, cfg.steps):
            total = torch.zeros(len(groups), dtype=torch.float64, device=self.device)
            for micro in range(self.rank, micros, self.world):
                loss, n_tok = step_loss(step, micro)
                (loss.sum() / micros).backward()
                total += loss.detach().double().reshape(-1) / micros
                tokens += n_tok
            if self.world > 1:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    torch.distributed.all_reduce(p.grad)
                torch.distributed.all_reduce(total)
            if cfg.max_grad_norm:
                for g in groups:
                    torch.nn.utils.clip_grad_norm_(g, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            per_run = total.tolist()
            losses.append(per_run if grid else per_run[0])
            rate = tokens / (time.perf_counter() - t0)
            shown = sum(per_run) / len(per_run)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{shown:.3f}", tok_s=f"{rate:.0f}")
            else:
                stage_bar.set_postfix(run=name, step=f"{step + 1}/{cfg.steps}", loss=f"{shown:.3f}")
            record = dict(stage=name, step=step + 1, loss=shown, lr=sched.get_last_lr()[0], tokens_per_s=rate)
            if grid:
                record["run_losses"] = per_run
            self._log(record)
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
        teachers.to(self.device, PROMPT_DTYPE)
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
        by ``fused_distill_loss`` (no logits tensor). The teachers run once, before the first step
        (``distill_loss.teacher_cache``), unless the cache is ``off``."""
        cfg, loss_cfg, tasks = self.config.distill, self.config.distill_loss, self.sources
        self._seed("distill")
        student = MultitaskPrompt(len(tasks), self.config.prompt_len, self.hidden, rank=self.config.rank,
                                  task_names=[t.name for t in tasks])
        with torch.no_grad():  # P* starts at the teachers' mean; U V near ones, so every task starts there
            student.prompt_embeddings.copy_(teachers.prompts.float().mean(0))
        student.to(self.device, PROMPT_DTYPE)
        teachers.requires_grad_(False)
        s_lm, t_lm = self._lm(student), self._lm(teachers)
        collate, examples = self._collator(tasks), flatten(tasks)
        sampler = TaskSubsetSampler(task_sizes(tasks), cfg.batch_size, seed=self.config.seed + 1, min_tasks=loss_cfg.min_tasks)
        batches = _batches(sampler, cfg.steps, self._micro(cfg))
        head = self.model.lm_head.weight
        cache, done = None, self._resume_state(self.out / "distill.ckpt")
        if done is None or done["step"] < cfg.steps:
            cache = build_teacher_cache(t_lm, collate, examples, batches, device=self.device,
                                        mode=loss_cfg.teacher_cache, folder=self.out / "teacher_cache",
                                        batch_size=loss_cfg.teacher_cache_batch_size, disable_bar=self.rank != 0)
            self.teacher_cache_mode = "off" if cache is None else cache.mode

        def step_loss(step, micro):
            indices = batches[step * self._micro(cfg) + micro]
            b = self._batch(collate, examples, indices)
            args = (b["input_ids"], b["attention_mask"], b["task_ids"])
            valid = b["labels"] != -100
            if cache is None:
                with torch.no_grad():
                    h_t = t_lm(*args, return_logits=False).predictor_hidden[valid]
            else:
                h_t = cache.rows(indices)
            s_out = s_lm(*args, return_logits=False)
            h_s, labels = s_out.predictor_hidden[valid], b["labels"][valid]
            weights = dict(temperature=loss_cfg.temperature, kl_weight=loss_cfg.kl_weight,
                           ce_weight=loss_cfg.ce_weight, hidden_weight=loss_cfg.hidden_weight)
            loss = (s_lm.head_loss(h_s, h_t, labels, **weights) if self.config.fused
                    else _plain_distill_loss(h_s, h_t, head, labels, logit_softcap=s_lm.logit_softcap, **weights))
            return loss, int(b["attention_mask"].sum())

        self._train("distill", student, cfg, step_loss)
        return student

    # ------------------------------------------------------------------ stage 3
    def target_runs(self) -> list[Run]:
        """The grid: every target x k x seed (one seed for k = 0, where nothing is drawn) x method."""
        cfg = self.config.target_init
        return [Run(task, k, seed, method) for task in self.targets for k in cfg.shots
                for seed in (cfg.seeds if k else cfg.seeds[:1]) for method in ["mpt", *self.config.baselines]]

    def target_prompt(self, run: Run, student: MultitaskPrompt):
        """The run's one-task prompt before training: MPT from the student (``target_init.init``),
        prompt tuning from the embeddings of the task's instruction. Seeded by the run's name."""
        self._seed(run.name)
        if run.method == "mpt":
            return MultitaskPrompt.from_source(student, self.config.target_init.init, num_tasks=1,
                                               task_names=[run.task.name])
        prompt = TaskPrompts(1, self.config.prompt_len, self.hidden, task_names=[run.task.name])
        self._text_init(prompt, run.task, 0)
        return prompt.to(self.device, PROMPT_DTYPE)

    def train_prompt_grid(self, runs: list[Run], prompts: list, name: str = "targets-grid") -> PromptStack:
        """Train the prompts of ``runs`` (one per run, e.g. from :meth:`target_prompt`) together: each
        step packs every run's micro-batch into one ``PromptedLM`` call, each run's prompt computed
        once; the loss is the sum of each run's mean loss, with per-run clipping and schedule, so
        every run follows its solo trajectory. Checkpointed as ``<name>.ckpt``; returns the stack."""
        cfg = self.config.target
        stack = PromptStack(prompts, task_names=[r.name for r in runs])
        if not runs:
            return stack
        collate = self._collator(list({r.task.name: r.task for r in runs}.values()))
        lm = self._lm(stack)

        def step_loss(step, micro):
            chosen = [(slot, ex) for slot, r in enumerate(runs) for ex in r.batch(step, micro, cfg.batch_size)]
            b = self._batch(collate, [ex for _, ex in chosen])
            slots = torch.tensor([slot for slot, _ in chosen], device=self.device)
            out = lm(b["input_ids"], b["attention_mask"], slots, return_logits=False)
            valid = b["labels"] != -100  # the target tokens: only their rows go through the lm_head
            h = out.predictor_hidden[valid]
            token_loss = lm.head_loss(h, h.detach(), b["labels"][valid], kl_weight=0.0, ce_weight=1.0, reduction="none")
            token_run = slots[:, None].expand_as(valid)[valid]
            return per_run_mean(token_loss, token_run, len(runs)), int(b["attention_mask"].sum())

        self._train(name, stack, cfg, step_loss, groups=[list(p.parameters()) for p in prompts])
        return stack

    def _lora_params(self, peft_model, adapter: str) -> list[torch.nn.Parameter]:
        """Make ``adapter``'s LoRA matrices the only trainable parameters and return them."""
        mine = []
        for n, p in peft_model.named_parameters():
            p.requires_grad_(f".{adapter}." in n and "lora_" in n)
            if p.requires_grad:
                mine.append(p)
        return mine

    def train_lora(self, run: Run, peft_model) -> dict:
        """Train a LoRA adapter named after ``run`` on the shared ``peft_model`` (no copy of the frozen
        weights), score it through the engine, save it, and remove it. Returns the result row."""
        cfg = self.config.target
        self._seed(run.name)
        peft_model.add_adapter(run.name, self._lora_config())
        peft_model.set_adapter(run.name)
        try:
            params = self._lora_params(peft_model, run.name)
            collate = self._collator([run.task])

            def step_loss(step, micro):
                b = self._batch(collate, run.batch(step, micro, cfg.batch_size))
                loss = peft_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
                return loss, int(b["attention_mask"].sum())

            self._train(run.name, peft_model, cfg, step_loss)
            peft_model.eval()
            # evaluated with the adapter active but not merged: merging into the frozen weights and
            # unmerging after would leave rounding residue in them after every run
            res = evaluate_runs(peft_model.get_base_model(), self.tokenizer, [EvalRun(run.name, run.task, None)],
                                max_new_tokens=self.config.max_new_tokens, max_length=self.config.max_length,
                                max_running=self.config.eval_max_running, progress=False)[run.name]
            if self.rank == 0:
                peft_model.save_pretrained(self.out / "adapters", selected_adapters=[run.name])
            return self._row(run, sum(p.numel() for p in params), res)
        finally:
            peft_model.set_adapter(IDLE_ADAPTER)
            peft_model.delete_adapter(run.name)

    def _lora_config(self):
        """The LoRA baseline's ``peft.LoraConfig``, from ``config.lora``."""
        from peft import LoraConfig

        cfg = self.config.lora
        return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=list(cfg.target_modules))

    def _lora_size(self) -> int:
        """Trainable parameters of one LoRA adapter: r (in + out) per adapted projection."""
        cfg = self._lora_config()
        return sum(cfg.r * (m.in_features + m.out_features) for n, m in self.model.named_modules()
                   if n.rsplit(".", 1)[-1] in cfg.target_modules and hasattr(m, "in_features"))

    def _row(self, run: Run, params: int, res: dict) -> dict:
        """The run's results row; its generated texts (``res["texts"]``, in ``task.eval`` order) go to
        ``<output_dir>/generations.jsonl`` beside the gold targets, one line per run."""
        if self.rank == 0 and "texts" in res:
            with open(self.out / "generations.jsonl", "a") as f:
                f.write(json.dumps({"run": run.name, "texts": res["texts"],
                                    "gold": [ex.target for ex in run.task.eval]}) + "\n")
        return dict(task=run.task.name, method=run.method, k=run.k, seed=run.seed, params=params,
                    metric=res["metric"], score=res["score"])

    def adapt_targets(self, student: MultitaskPrompt) -> list[dict]:
        """Each held-out target, k-shot for every k and seed: MPT initialised from the student, and the
        baselines (single-task prompt tuning from the instruction's embeddings; LoRA via peft).

        Every prompt run trains in one batched stream (:meth:`train_prompt_grid`); the prompt runs and
        the k = 0 LoRA runs (the model as it is) are scored in one engine ``generate`` call; each
        k > 0 LoRA run trains and is scored on one shared PEFT model. Every trained prompt (MPT and
        prompt tuning) and LoRA adapter is exported as a PEFT adapter under ``<output_dir>/adapters/``."""
        runs = self.target_runs()
        prompt_runs = [r for r in runs if r.method in PROMPT_METHODS]
        prompts = {r.name: self.target_prompt(r, student) for r in prompt_runs}
        trained = [r for r in prompt_runs if r.k]
        if trained:  # none when every k is 0
            self.train_prompt_grid(trained, [prompts[r.name] for r in trained])
        lora_runs = [r for r in runs if r.method == "lora"]
        evals = [EvalRun(r.name, r.task, prompts[r.name]) for r in prompt_runs]
        evals += [EvalRun(r.name, r.task, None) for r in lora_runs if not r.k]
        scores = evaluate_runs(self.model, self.tokenizer, evals, max_new_tokens=self.config.max_new_tokens,
                               max_length=self.config.max_length, max_running=self.config.eval_max_running)
        rows = {r.name: self._row(r, sum(p.numel() for p in prompts[r.name].parameters()), scores[r.name])
                for r in prompt_runs}
        rows.update((r.name, self._row(r, self._lora_size(), scores[r.name])) for r in lora_runs if not r.k)
        if self.rank == 0:
            for r in trained:  # MPT and prompt-tuning prompts alike: PEFT adapters `mptkern serve` reads
                prompts[r.name].to_peft(self.out / "adapters" / r.name, instructions={r.task.name: r.task.instruction})
        trained_lora = [r for r in lora_runs if r.k]
        if trained_lora:
            from peft import get_peft_model

            # one PeftModel for every LoRA run: each run adds its adapter and deletes it after
            self._seed("lora-base")
            peft_model = get_peft_model(self.model, self._lora_config(), adapter_name=IDLE_ADAPTER)
            self._stage_bar = tqdm(total=len(trained_lora), desc="lora runs", unit="run", disable=self.rank != 0)
            try:
                for r in trained_lora:
                    rows[r.name] = self.train_lora(r, peft_model)
                    self._stage_bar.update(1)
            finally:
                self._stage_bar.close()
                self._stage_bar = None
                peft_model.unload()  # the backbone as it was: LoRA layers out, weights untouched
                self.model.requires_grad_(False).eval()
        results = [rows[r.name] for r in runs]
        for res in results:
            self._log(dict(stage="target", **res))
        return results

    # ------------------------------------------------------------------ all
    def run(self) -> list[dict]:
        """Teachers -> distillation -> targets; exports the student and every trained MPT target prompt
        as PEFT adapters; returns the per-(target, method, k, seed) results, also written to
        ``results.json``, ``results.csv`` and plotted in ``results.png``; ``stage_seconds`` holds each
        stage's wall time."""
        timed = self.stage_seconds = {}
        t0 = time.perf_counter()
        teachers = self.train_teachers()
        timed["teachers"], t0 = time.perf_counter() - t0, time.perf_counter()
        student = self.distill(teachers)
        if self.rank == 0:
            student.to_peft(self.out / "student_adapter", instructions={t.name: t.instruction for t in self.sources})
        timed["distill"], t0 = time.perf_counter() - t0, time.perf_counter()
        results = self.adapt_targets(student)
        timed["targets"] = time.perf_counter() - t0
        if self.rank == 0:
            write_results(results, self.out)
            plot_results(results, self.out / "results.png", title=f"{type(self.model).__name__}, k-shot targets")
        return results

    format_results = staticmethod(format_results)
