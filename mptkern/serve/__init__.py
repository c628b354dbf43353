"""Multi-task inference: one frozen model, many task prompts, each prompt's K/V computed once."""

from mptkern.serve.engine import MultiTaskEngine, Request, Result
from mptkern.serve.server import Server, serve

__all__ = ["MultiTaskEngine", "Request", "Result", "Server", "serve"]
