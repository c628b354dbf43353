"""The MPT trainer: teachers -> distillation -> target adaptation, with its config and checkpoints."""

from mptkern.train.checkpoint import load_checkpoint, save_checkpoint
from mptkern.train.config import DataConfig, DistillConfig, StageConfig, TargetConfig, TrainConfig, load_config
from mptkern.train.trainer import MPTTrainer

__all__ = ["MPTTrainer", "TrainConfig", "StageConfig", "DistillConfig", "TargetConfig", "DataConfig", "load_config",
           "save_checkpoint", "load_checkpoint"]
