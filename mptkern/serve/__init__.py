"""Multi-task inference: one frozen model, many task prompts, each prompt's K/V computed once."""

from mptkern.serve.engine import MultiTaskEngine, Request, Result, Update
from mptkern.serve.server import Server, serve
from mptkern.serve.export import build_prompt_embeds, export_prompt_embeds, load_prompt_embeds

__all__ = ["MultiTaskEngine", "Request", "Result", "Update", "Server", "serve"]
