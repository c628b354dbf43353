"""Trainer configuration: dataclasses, loadable from YAML or JSON, every field with a default.

``L = ce_weight * L_LM + kl_weight * L_KL + hidden_weight * L_hidden`` in the distillation stage;
the paper's ``L_LM + lambda (L_KL + L_hidden)`` is ``ce_weight=1, kl_weight=hidden_weight=lambda``.
"""

from __future__ import annotations

import dataclasses
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
class TrainConfig:
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
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    teachers: StageConfig = dataclasses.field(default_factory=StageConfig)
    distill: StageConfig = dataclasses.field(default_factory=StageConfig)
    distill_loss: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    target: StageConfig = dataclasses.field(default_factory=lambda: StageConfig(steps=30, batch_size=8))
    target_init: TargetConfig = dataclasses.field(default_factory=TargetConfig)
    baselines: list[str] = dataclasses.field(default_factory=lambda: ["prompt_tuning", "lora"])
    fused: bool = True  # shared-prefix packing + fused_distill_loss; False: concatenation + full-logit losses

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
