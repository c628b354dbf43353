"""Trainer configuration: dataclasses, loadable from YAML or JSON, every field with a default.

``L = ce_weight * L_LM + kl_weight * L_KL + hidden_weight * L_hidden`` in the distillation stage;
the paper's ``L_LM + lambda (L_KL + L_hidden)`` is ``ce_weight=1, kl_weight=hidden_weight=lambda``.

Every checkpoint records :func:`config_fingerprint` of the config that wrote it, and a stage resumes
only under a config with the same fingerprint (see :mod:`mptkern.train.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from pathlib import Path


@dataclasses.dataclass
class StageConfig:
    """One training stage: optimiser, schedule, batching, logging and checkpoint cadence."""

    steps: int = 100
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-2
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: str = "linear"  # linear | cosine | constant (after warmup)
    max_grad_norm: float | None = 1.0
    checkpoint_every: int = 50

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0 or self.warmup_steps < 0:
            raise ValueError(f"steps and warmup_steps must be >= 0, got {self.steps} and {self.warmup_steps}")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"schedule must be linear, cosine or constant, got {self.schedule!r}")


@dataclasses.dataclass
class DistillConfig:
    temperature: float = 2.0
    ce_weight: float = 1.0
    kl_weight: float = 1.0
    hidden_weight: float = 1.0
    min_tasks: int = 2  # tasks per batch drawn uniformly from [min_tasks, K] (stochastic task sampling)
    teacher_cache: str = "auto"  # auto | memory | disk | off: the teachers' outputs computed once (see train.teacher_cache)
    teacher_cache_batch_size: int = 32  # examples per no-grad teacher pass while the cache is built

    def __post_init__(self):
        if self.teacher_cache_batch_size < 1:
            raise ValueError(f"teacher_cache_batch_size must be >= 1, got {self.teacher_cache_batch_size}")


@dataclasses.dataclass
class TargetConfig:
    init: str = "average_source_tasks"  # average_source_tasks | exact_source_task | only_source_shared
    shots: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 5, 10, 20])
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])


@dataclasses.dataclass
class DataConfig:
    synthetic_seed: int = 0
    n_train: int = 64  # per source task
    n_eval: int = 16  # per task
    registry: str | None = None  # a task registry YAML for real datasets, or "public" / "clinical" (shipped ones)
    data_root: str | None = None
    tasks: list[str] | None = None  # registry data: load only these entries (default: all)
    limit: int | None = None  # registry data: at most this many train examples per task (a seeded sample)
    eval_limit: int | None = None  # registry data: at most this many eval examples per task (a seeded sample)


@dataclasses.dataclass
class LoraBaselineConfig:
    """The LoRA baseline of the target stage: ``peft.LoraConfig(r=rank, lora_alpha=alpha,
    lora_dropout=dropout, target_modules=target_modules)``, one adapter per k > 0 run."""

    rank: int = 4
    alpha: float = 8
    dropout: float = 0.0
    target_modules: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora target_modules must name at least one module")


@dataclasses.dataclass
class TrainConfig:
    """The whole recipe. Top-level keys besides the nested sections:

    * ``max_length`` (256): tokens per training row (source + answer) and longest formatted eval
      input; longer inputs are cut, answers never (the collator and the evaluation both use it).
    * ``eval_batch_size`` (16): the HF-generate batch of ``bench/bench_recipe.py``'s old-way
      baseline only; the trainer's own evaluation goes through the engine, batched by
      ``eval_max_running``.
    * ``eval_max_running`` (64): requests the evaluation engine decodes at once (its batch; it
      bounds the engine's K/V memory).
    * ``lora`` (:class:`LoraBaselineConfig`): rank 4, alpha 8, dropout 0.0, target modules
      ``q_proj`` and ``v_proj``.

    and ``distill_loss.teacher_cache_batch_size`` (32): examples per teacher pass while the
    teacher cache is built. A config written before a key existed loads with its default.
    """

    model: str = "default"  # "default" (embedded SmolLM2) or a local Hugging Face model folder
    prompt_len: int = 16
    rank: int = 1
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    output_dir: str = "runs/mpt"
    max_new_tokens: int = 32
    max_length: int = 256  # tokens per training row (source + answer); longer inputs are cut, answers never
    eval_batch_size: int = 16  # HF-generate batch of bench/bench_recipe.py's old-way baseline; the engine batches by itself
    eval_max_running: int = 64  # requests the evaluation engine decodes at once
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    teachers: StageConfig = dataclasses.field(default_factory=StageConfig)
    distill: StageConfig = dataclasses.field(default_factory=StageConfig)
    distill_loss: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    target: StageConfig = dataclasses.field(default_factory=lambda: StageConfig(steps=30, batch_size=8))
    target_init: TargetConfig = dataclasses.field(default_factory=TargetConfig)
    baselines: list[str] = dataclasses.field(default_factory=lambda: ["prompt_tuning", "lora"])
    lora: LoraBaselineConfig = dataclasses.field(default_factory=LoraBaselineConfig)
    fused: bool = True  # shared-prefix packing + fused_distill_loss; False: concatenation + full-logit losses

    def __post_init__(self):
        for name in ("max_length", "eval_batch_size", "eval_max_running"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Keys that do not change what a stage trains, so a resume may change them. Everything else counts.
FINGERPRINT_IGNORED = (
    "output_dir",  # where the files go; a moved run folder resumes
    "device",  # placement only (the dtype it resolves to is recorded as ``dtype``)
    "max_new_tokens", "eval_batch_size", "eval_max_running",  # evaluation only, after training
    "distill_loss.teacher_cache", "distill_loss.teacher_cache_batch_size",  # how the teachers' fixed
    # outputs are computed (cached or not, in which batches), not what they are; the cache is rebuilt on resume
    "teachers.checkpoint_every", "distill.checkpoint_every", "target.checkpoint_every",  # when state is saved
)


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_fingerprint(config: TrainConfig, dtype: str | None = None) -> dict:
    """What a checkpoint records of the config that wrote it: ``{"sha256": hex digest, "config":
    {dotted key: value}}``, every key of ``config`` (nested ones as ``"teachers.steps"``) except
    :data:`FINGERPRINT_IGNORED`.

    Ignored, since they do not change what is trained: ``output_dir``; ``device`` (the dtype it
    resolves to counts: pass it as ``dtype``, e.g. ``"float32"`` for ``"auto"`` on CPU);
    ``max_new_tokens``, ``eval_batch_size`` and ``eval_max_running`` (evaluation only);
    ``distill_loss.teacher_cache`` and ``distill_loss.teacher_cache_batch_size`` (how the
    teachers' fixed outputs are computed, not what they are); each stage's ``checkpoint_every``
    (when state is saved). Counted: everything else, including ``fused`` (a different
    computation of the same objective, equal only to rounding), the target grid (``target_init``,
    ``baselines``) and ``lora``: one output folder holds the checkpoints of one run, so every
    stage's checkpoint carries the whole fingerprint."""
    flat = _flatten(config.to_dict())
    if dtype is not None:
        flat["dtype"] = dtype
    kept = {k: v for k, v in sorted(flat.items()) if k not in FINGERPRINT_IGNORED}
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "config": kept}


def fingerprint_changes(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """``(key, saved value, current value)`` for every key on which two fingerprints' configs
    differ. A key the saved one lacks (written before the key existed) counts as its default;
    a key only the saved one has is reported with ``"<no such key>"`` as its current value."""
    defaults = config_fingerprint(TrainConfig())["config"]
    missing = "<no such key>"
    changes = []
    for key in sorted(set(saved) | set(current)):
        old = saved.get(key, defaults.get(key, missing))
        new = current.get(key, missing)
        if old != new:
            changes.append((key, old, new))
    return changes


def from_dict(cls, data: dict):
    """Build dataclass ``cls`` from a (nested) dict; unknown keys are an error naming them."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} expects a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        kwargs[name] = from_dict(hint, value) if dataclasses.is_dataclass(hint) else value
    return cls(**kwargs)


def load_config(path: str | Path) -> TrainConfig:
    """A TrainConfig from a ``.yaml``/``.yml`` or ``.json`` file (missing keys keep their defaults)."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"config file must end in .yaml, .yml or .json: {path}")
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    return from_dict(TrainConfig, data)
