"""Multi-task inference: one frozen model, many task prompts, each prompt's K/V computed once."""

from mptkern.serve.engine import MultiTaskEngine, Request, Result

__all__ = ["MultiTaskEngine", "Request", "Result"]
