"""Scale-out path: export a task's prompt as prompt embeddings for vLLM's ``prompt_embeds`` input.

A prompt-tuned task is the frozen model run on ``[prompt rows | embeddings of the request's tokens]``
(the PEFT-style concatenation). vLLM accepts exactly such an input: a prompt given as embeddings, a
2-D tensor of shape ``(sequence_length, hidden_size)``, one row per position, in the model's dtype
(``vllm.inputs.EmbedsPrompt``; the engine must be built with ``enable_prompt_embeds=True``, or the
server started with ``--enable-prompt-embeds``). So one vLLM instance of the *unmodified* base model
serves every task: the task lives in the rows each request carries.

Export once per task (on the training machine)::

    from mptkern.serve.export import export_prompt_embeds
    export_prompt_embeds(prompt, "triage", "triage.safetensors", model=model,   # (l, d) in the model dtype
                         instruction=task.instruction)   # the instruction it was trained with

Use with vLLM (on the serving machine; needs the same base model's input embedding table)::

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams
    from mptkern.data import InputFormat
    from mptkern.serve.export import build_prompt_embeds, load_prompt_embeds

    rows, meta = load_prompt_embeds("triage.safetensors")          # meta["task"], meta["instruction"], ...
    tok = AutoTokenizer.from_pretrained(BASE)
    embedding = AutoModelForCausalLM.from_pretrained(BASE, torch_dtype=rows.dtype).get_input_embeddings()
    llm = LLM(model=BASE, enable_prompt_embeds=True, dtype=str(rows.dtype).removeprefix("torch."))
    ids = InputFormat(tok).source(meta["instruction"], "Patient denies chest pain.")[0]   # as in training
    out = llm.generate({"prompt_embeds": build_prompt_embeds(rows, embedding, ids)},
                       SamplingParams(temperature=0, max_tokens=32))

For vLLM's OpenAI-compatible server the same tensor travels base64-encoded (``torch.save`` of it)
in the completions request's ``prompt_embeds`` field. Positions count from 0 at the first prompt row,
exactly as in :class:`mptkern.models.PromptedLM` and :class:`mptkern.serve.MultiTaskEngine`, so greedy
outputs should agree with them up to the numerical differences of vLLM's kernels. What vLLM cannot
do this way: share one task's prompt K/V between requests (each request prefills its ``l`` prompt
rows again, unless vLLM's prefix caching covers embedding inputs in the version used) — that is the
reason the in-process engine exists.

Relied on (vLLM docs, "Prompt Embedding Inputs", v0.9-v0.11 and stable): ``EmbedsPrompt`` with
``prompt_embeds`` of shape ``(sequence_length, hidden_size)``; ``LLM(..., enable_prompt_embeds=True)``;
``--enable-prompt-embeds`` for ``vllm serve``. Not tested here against a vLLM install.

The input after the prompt rows must be formatted as in training (``InputFormat.source``: the
task's instruction, the input, the answer cue), or the prompt answers an input it never saw; the
file records the instruction for that.

File format: safetensors with one tensor ``prompt_embeds`` ``(l, d)`` and string metadata
``mptkern.task``, ``mptkern.hidden_size``, ``mptkern.prompt_len``, ``mptkern.dtype`` (e.g.
``"bfloat16"``), ``mptkern.format`` (``"prompt_embeds/1"``), when a model was given
``mptkern.model_type`` and ``mptkern.base_model``, and when an instruction was given
``mptkern.instruction`` and ``mptkern.input_format`` (:data:`mptkern.data.schema.INPUT_FORMAT`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mptkern.data.schema import INPUT_FORMAT
from mptkern.models.prompted import concat_prompt
from mptkern.prompts import _atomic_write

KEY = "prompt_embeds"
FORMAT = "prompt_embeds/1"

__all__ = ["KEY", "FORMAT", "task_prompt_rows", "export_prompt_embeds", "load_prompt_embeds", "build_prompt_embeds"]


def task_prompt_rows(prompt, task: int | str) -> torch.Tensor:
    """The ``(l, d)`` prompt rows of ``task`` (a name or an id) of a prompt module (``MultitaskPrompt``,
    ``TaskPrompts``), detached. ``prompt`` may also be ``(module, index)`` (then ``task`` must be None or
    that index). Raises KeyError for an unknown name, ValueError for an id out of range."""
    if isinstance(prompt, tuple):
        module, index = prompt
        if task is not None and task != index:
            raise ValueError(f"task {task!r} given with (module, {index})")
        task = index
    else:
        module = prompt
    if not isinstance(module, nn.Module) or not hasattr(module, "prompt_len"):
        raise TypeError(f"prompt must be a prompt module (MultitaskPrompt, TaskPrompts), got {type(module).__name__}")
    if isinstance(task, str):
        index = module.task_index(task)  # KeyError for an unknown name, ValueError without names
    elif isinstance(task, bool) or not isinstance(task, int):
        raise TypeError(f"a task is a name or an int id, got {task!r}")
    elif not 0 <= task < module.num_tasks:
        raise ValueError(f"task {task} is out of range [0, {module.num_tasks})")
    else:
        index = task
    with torch.no_grad():
        return module(torch.tensor([index], device=module.device))[0].detach()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def export_prompt_embeds(prompt, task: int | str, path: str | os.PathLike, *, model: nn.Module | None = None,
                         dtype: torch.dtype | None = None, instruction: str | None = None) -> Path:
    """Write ``task``'s prompt rows as an ``(l, d)`` ``prompt_embeds`` tensor to a safetensors file
    (atomically) and return its path.

    ``model``: the base model the prompt was trained for; its hidden size must equal the prompt's
    (ValueError otherwise) and its input embedding dtype is the default ``dtype`` (vLLM wants the
    model dtype). Without a model the default dtype is the prompt's. The task name in the metadata
    is ``task`` when it is a name, else the module's name for that id (or the id as text).
    ``instruction``: the instruction the task's inputs were formatted with in training, recorded so a
    server can format requests the same way."""
    rows = task_prompt_rows(prompt, task)
    module = prompt[0] if isinstance(prompt, tuple) else prompt
    task_id = task if isinstance(task, int) and not isinstance(task, bool) else None
    if isinstance(prompt, tuple):
        task_id = prompt[1]
    if isinstance(task, str):
        name = task
    else:
        names = getattr(module, "task_names", None)
        name = names[task_id] if names else str(task_id)
    l, d = rows.shape
    metadata = {"format": "pt", "mptkern.format": FORMAT, "mptkern.task": name, "mptkern.prompt_len": str(l),
                "mptkern.hidden_size": str(d)}
    if model is not None:
        hidden = model.config.hidden_size
        if hidden != d:
            raise ValueError(f"prompt hidden size {d} != model hidden size {hidden}")
        dtype = dtype or model.get_input_embeddings().weight.dtype
        metadata["mptkern.model_type"] = str(getattr(model.config, "model_type", ""))
        metadata["mptkern.base_model"] = str(getattr(model.config, "_name_or_path", "") or "")
    if instruction is not None:
        if not isinstance(instruction, str):
            raise TypeError(f"instruction must be a string, got {type(instruction).__name__}")
        metadata["mptkern.instruction"], metadata["mptkern.input_format"] = instruction, INPUT_FORMAT
    dtype = dtype or rows.dtype
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
    metadata["mptkern.dtype"] = _dtype_name(dtype)
    tensor = rows.to("cpu", dtype).contiguous()
    _atomic_write(path, lambda tmp: save_file({KEY: tensor}, tmp, metadata=metadata))
    return Path(path)


def load_prompt_embeds(path: str | os.PathLike, *, device: str | torch.device | None = None) -> tuple[torch.Tensor, dict]:
    """Read a file written by :func:`export_prompt_embeds`: ``(rows (l, d), metadata)``, where
    metadata holds ``task`` (str), ``hidden_size``, ``prompt_len`` (int), ``dtype`` (str), when
    present ``model_type`` and ``base_model``, and ``instruction`` (None when not recorded). Raises
    ValueError for another kind of file, a tensor that does not match its metadata, or an input
    format this version does not know."""
    with safe_open(os.fspath(path), framework="pt", device=str(device or "cpu")) as f:
        raw = f.metadata() or {}
        if raw.get("mptkern.format") != FORMAT or KEY not in f.keys():
            raise ValueError(f"{os.fspath(path)} is not a {FORMAT} file")
        rows = f.get_tensor(KEY)
    meta = {k.removeprefix("mptkern."): v for k, v in raw.items() if k.startswith("mptkern.") and k != "mptkern.format"}
    meta["hidden_size"], meta["prompt_len"] = int(meta["hidden_size"]), int(meta["prompt_len"])
    meta.setdefault("instruction", None)
    if meta["instruction"] is not None and meta.pop("input_format", None) != INPUT_FORMAT:
        raise ValueError(f"{os.fspath(path)}: its input format is not {INPUT_FORMAT!r}, the one this mptkern formats with")
    if rows.dim() != 2 or tuple(rows.shape) != (meta["prompt_len"], meta["hidden_size"]) or _dtype_name(rows.dtype) != meta["dtype"]:
        raise ValueError(f"{os.fspath(path)}: tensor {rows.dtype} {tuple(rows.shape)} does not match its metadata {meta}")
    return rows, meta


def build_prompt_embeds(prompt_rows: torch.Tensor, embedding: nn.Module | torch.Tensor,
                        input_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``(l + n, d)``: the task's prompt rows followed by the embeddings of ``input_ids`` (n tokens)
    from ``embedding`` (the base model's input embedding module, or its ``(V, d)`` weight) — the
    PEFT-style concatenated input, what vLLM's ``{"prompt_embeds": ...}`` takes.

    The result is in the embedding table's dtype and on its device (the prompt rows are cast and
    moved). Raises ValueError when the widths differ, the ids are not 1-D, empty or out of range."""
    if not isinstance(prompt_rows, torch.Tensor) or prompt_rows.dim() != 2 or not prompt_rows.is_floating_point():
        raise ValueError(f"prompt_rows must be a floating point (l, d) tensor, got "
                         f"{getattr(prompt_rows, 'dtype', type(prompt_rows).__name__)} {tuple(getattr(prompt_rows, 'shape', ()))}")
    weight = embedding if isinstance(embedding, torch.Tensor) else getattr(embedding, "weight", None)
    if weight is None or weight.dim() != 2:
        raise TypeError("embedding must be an input embedding module with a (V, d) weight, or that weight")
    V, d = weight.shape
    if prompt_rows.shape[1] != d:
        raise ValueError(f"prompt rows have width {prompt_rows.shape[1]} but the embedding size is {d}")
    ids = torch.as_tensor(input_ids if isinstance(input_ids, torch.Tensor) else list(input_ids), dtype=torch.long)
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty 1-D sequence of token ids, got shape {tuple(ids.shape)}")
    if int(ids.min()) < 0 or int(ids.max()) >= V:
        raise ValueError(f"input_ids must lie in [0, {V})")
    ids = ids.to(weight.device)
    with torch.no_grad():
        tokens = embedding(ids) if isinstance(embedding, nn.Module) else weight[ids]
    rows = prompt_rows.detach().to(weight.device, weight.dtype)[None]
    return concat_prompt(rows, tokens[None], torch.ones(1, tokens.shape[0], dtype=torch.long, device=weight.device))[0][0]
