"""mptkern: fused kernels, trainer and multi-task inference for Multitask Prompt Tuning."""

__version__ = "0.1.0"
