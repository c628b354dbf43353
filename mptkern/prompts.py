"""Prompt modules: ``TaskPrompts`` (one free prompt per task) and ``MultitaskPrompt`` (MPT's
decomposed prompt), their init modes, safetensors save/load and PEFT adapter import/export.

``TaskPrompts`` holds the single-task teacher prompts ``P_k (l, d)`` of MPT's source stage.
``MultitaskPrompt`` is the decomposed student prompt: a shared prompt ``P* (l, d)`` and per task a
rank-r pair ``U_t (l, r)``, ``V_t (r, d)``; task t's prompt is ``P* * (U_t @ V_t)``. Parameter names
and layout follow PEFT's MultitaskPromptTuning (``prompt_embeddings``, ``prefix_task_cols``,
``prefix_task_rows``), so a checkpoint of either library is a checkpoint of the other.

Init modes of ``MultitaskPrompt`` and how they map to PEFT's ``MultitaskPromptTuningInit``:

==========================  ==========================================================================
``init="near_ones"``        (default) ``P* ~ N(0, 0.02²)``, ``U V`` = all-ones + noise: every task starts
                            near ``P*``. Not a PEFT mode; it lets tasks share ``P*`` from step 0.
``init="peft"``             PEFT's ``RANDOM``: ``P* ~ N(0, 1)`` (``nn.Embedding``'s init), ``U, V ~
                            N(0, 0.02²)``, drawn in PEFT's order, so the same seed gives the same values.
``init_from_text``          PEFT's ``TEXT``: ``P*`` = embeddings of the text's tokens, repeated or cut to
                            ``l``; ``U, V`` unchanged.
``from_source(...)``        ``AVERAGE_SOURCE_TASKS`` / ``EXACT_SOURCE_TASK`` / ``ONLY_SOURCE_SHARED``.
==========================  ==========================================================================

Growing either module with ``add_task`` replaces its per-task Parameters by larger ones: rebuild
the optimizer afterwards (it still holds the old tensors).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mptkern.data.schema import INPUT_FORMAT
from mptkern.ops import decomposed_prompts

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_TYPE = "MULTITASK_PROMPT_TUNING"
# PEFT task types whose prompt has one transformer submodule (decoder-only or encoder-only use)
PEFT_TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
SOURCE_MODES = ("average_source_tasks", "exact_source_task", "only_source_shared")
RANDOM_INITS = ("near_ones", "peft")
_FORMAT_VERSION = "1"


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``: readers
    see the old file or the complete new one, never a partial one."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_text(text: str) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return write


def _check_names(names: Sequence[str] | None, num_tasks: int) -> list[str] | None:
    if names is None:
        return None
    names = list(names)
    if len(names) != num_tasks:
        raise ValueError(f"task_names has {len(names)} entries but there are {num_tasks} tasks")
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"task_names must be non-empty strings, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"task_names must be unique, got {names!r}")
    return names


def _check_task_ids(task_ids: torch.Tensor, num_tasks: int, device: torch.device) -> None:
    """The checks ``ops.decomposed_prompts`` makes on ``task_ids``, with the same errors."""
    if not isinstance(task_ids, torch.Tensor):
        raise TypeError(f"task_ids must be an integer tensor of shape (B,), got {type(task_ids).__name__}")
    if (
        task_ids.dim() != 1
        or task_ids.dtype.is_floating_point
        or task_ids.dtype.is_complex
        or task_ids.dtype == torch.bool
    ):
        raise ValueError(
            f"task_ids must be an integer tensor of shape (B,), got {task_ids.dtype} of shape {tuple(task_ids.shape)}"
        )
    if task_ids.shape[0] == 0:
        raise ValueError("task_ids is empty: expected shape (B,) with B >= 1")
    if task_ids.device != device:
        raise ValueError(f"task_ids is on {task_ids.device} but the prompts are on {device}")
    lo, hi = (int(x) for x in torch.aminmax(task_ids))
    if lo < 0 or hi >= num_tasks:
        raise ValueError(f"task_ids must lie in [0, {num_tasks}), got values in [{lo}, {hi}]")


def _text_rows(embeddings: nn.Module | torch.Tensor, token_ids: Sequence[int] | torch.Tensor, l: int) -> torch.Tensor:
    """``(l, d)`` embeddings of ``token_ids`` cut or repeated to ``l`` rows, as PEFT's TEXT init does."""
    ids = [int(t) for t in (token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids)]
    if not ids:
        raise ValueError("init_from_text needs at least one token id")
    ids = (ids * math.ceil(l / len(ids)))[:l]
    if isinstance(embeddings, torch.Tensor):
        return embeddings.detach()[torch.tensor(ids, device=embeddings.device)]
    weight = getattr(embeddings, "weight", None)
    device = weight.device if weight is not None else None
    return embeddings(torch.tensor(ids, device=device)).detach()


def _grown(param: nn.Parameter, row: torch.Tensor) -> nn.Parameter:
    """A new Parameter holding ``param``'s rows (copied bit for bit) followed by ``row``."""
    data = torch.cat([param.detach(), row.to(param).unsqueeze(0)])
    return nn.Parameter(data, requires_grad=param.requires_grad)


def _read_safetensors(path: str | os.PathLike, device: str | torch.device | None) -> tuple[dict, dict]:
    tensors = {}
    with safe_open(os.fspath(path), framework="pt", device=str(device or "cpu")) as f:
        metadata = f.metadata() or {}
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return tensors, metadata


# ----------------------------------------------------------------------------------------------
# shared base
# ----------------------------------------------------------------------------------------------
class _PromptModule(nn.Module):
    """Task names, dtype/device, validation and safetensors save/load shared by both modules."""

    _per_task_params: tuple[str, ...] = ()

    def _init_names(self, task_names: Sequence[str] | None, num_tasks: int) -> None:
        self._task_names = _check_names(task_names, num_tasks)

    @property
    def task_names(self) -> list[str] | None:
        """Names of the tasks (a copy), or None when the module was built without names."""
        return None if self._task_names is None else list(self._task_names)

    def write_rows(self, task_ids: torch.Tensor, out: torch.Tensor, row_offsets: torch.Tensor) -> torch.Tensor:
        """Write task ``task_ids[b]``'s ``l`` prompt rows to ``out[row_offsets[b]:][:l]`` (differentiable).

        ``out``: ``(R, d)`` buffer in the prompt's dtype, e.g. a packed embedding stream;
        ``row_offsets``: ``(B,)`` integer. Returns ``out``."""
        rows = (row_offsets[:, None] + torch.arange(self.prompt_len, device=out.device)).flatten()
        return out.index_copy_(0, rows, self(task_ids).flatten(0, 1))

    def task_index(self, name: str) -> int:
        """Task id of ``name``; raises KeyError for an unknown name, ValueError without names."""
        if self._task_names is None:
            raise ValueError(f"this {type(self).__name__} has no task_names")
        try:
            return self._task_names.index(name)
        except ValueError:
            raise KeyError(f"unknown task {name!r}; tasks are {self._task_names}") from None

    def _resolve_task(self, task: int | str) -> int:
        if isinstance(task, str):
            return self.task_index(task)
        if isinstance(task, bool) or not isinstance(task, int):
            raise TypeError(f"a task is an int id or a name, got {task!r}")
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task {task} is out of range [0, {self.num_tasks})")
        return task

    def _next_name(self, name: str | None) -> None:
        if self._task_names is None:
            if name is not None:
                raise ValueError("this module has no task_names; build it with task_names to name tasks")
            return
        if name is None:
            raise ValueError("this module names its tasks: pass name= for the new task")
        self._task_names = _check_names([*self._task_names, name], len(self._task_names) + 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def num_tasks(self) -> int:
        return getattr(self, self._per_task_params[0]).shape[0]

    def _config(self) -> dict:
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> None:
        """Write the parameters to a safetensors file, atomically (temporary file + rename).

        Tensor keys are the parameter names (for ``MultitaskPrompt`` those of PEFT, so the file also
        serves as PEFT's ``prompt_tuning_init_state_dict_path``). Metadata: ``mptkern.class``,
        ``mptkern.config`` (JSON: sizes, rank, task names, init) and ``mptkern.shapes`` (JSON).
        Dtypes are kept as they are.
        """
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        metadata = {
            "format": "pt",
            "mptkern.format_version": _FORMAT_VERSION,
            "mptkern.class": type(self).__name__,
            "mptkern.config": json.dumps(self._config()),
            "mptkern.shapes": json.dumps({k: list(v.shape) for k, v in tensors.items()}),
        }
        _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device | None = None, **kwargs):
        """Read a file written by :meth:`save` of the same class; the parameters keep the file's
        dtype, on ``device`` (default CPU). ``kwargs`` go to the constructor (e.g. ``backend``)."""
        tensors, metadata = _read_safetensors(path, device)
        found = metadata.get("mptkern.class")
        if found != cls.__name__:
            raise ValueError(f"{os.fspath(path)} holds a {found or 'non-mptkern file'}, not a {cls.__name__}")
        config = json.loads(metadata["mptkern.config"])
        shapes = json.loads(metadata["mptkern.shapes"])
        if {k: list(v.shape) for k, v in tensors.items()} != shapes:
            raise ValueError(f"{os.fspath(path)}: tensor shapes do not match the metadata {shapes}")
        return cls._from_tensors(tensors, config, **kwargs)

    @classmethod
    def _from_tensors(cls, tensors: dict, config: dict, **kwargs):
        """Build a module around ``tensors`` without drawing random numbers (meta-device build)."""
        with torch.device("meta"):
            module = cls(**config, **kwargs)
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if expected != got:
            raise ValueError(f"{cls.__name__} with config {config} needs tensors {expected}, got {got}")
        module.load_state_dict(tensors, assign=True)
        return module


# ----------------------------------------------------------------------------------------------
# TaskPrompts
# ----------------------------------------------------------------------------------------------
class TaskPrompts(_PromptModule):
    """One free prompt per task: the single-task teacher prompts of MPT's source stage.

    Args:
        num_tasks: K. prompt_len: l. hidden_size: d.
        task_names: optional K unique names (see :meth:`task_index`).
        init_std: prompts start as ``N(0, init_std²)``; also used by ``add_task(init="random")``.
        dtype, device: of the parameter (default: torch's defaults).

    Parameter ``prompts (K, l, d)``. ``forward(task_ids (B,) int) -> (B, l, d)`` in its dtype.

    Example::

        teachers = TaskPrompts(3, 100, 576, task_names=["ner", "re", "qa"])
        teachers.init_from_text(model.get_input_embeddings(), tokenizer("Extract the entities.")["input_ids"])
        prompts = teachers(torch.tensor([teachers.task_index("qa"), 0]))  # (2, 100, 576)
    """

    _per_task_params = ("prompts",)

    def __init__(
        self,
        num_tasks: int,
        prompt_len: int,
        hidden_size: int,
        *,
        task_names: Sequence[str] | None = None,
        init_std: float = 0.02,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ):
        super().__init__()
        if min(num_tasks, prompt_len, hidden_size) < 1:
            sizes = (num_tasks, prompt_len, hidden_size)
            raise ValueError(f"num_tasks, prompt_len, hidden_size must be >= 1, got {sizes}")
        self._init_names(task_names, num_tasks)
        self.init_std = float(init_std)
        prompts = torch.randn(num_tasks, prompt_len, hidden_size, dtype=dtype, device=device) * init_std
        self.prompts = nn.Parameter(prompts)

    @property
    def prompt_len(self) -> int:
        return self.prompts.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.prompts.shape[2]

    def _config(self) -> dict:
        return dict(num_tasks=self.num_tasks, prompt_len=self.prompt_len, hidden_size=self.hidden_size,
                    task_names=self.task_names, init_std=self.init_std)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, prompt_len={self.prompt_len}, hidden_size={self.hidden_size}"

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        _check_task_ids(task_ids, self.num_tasks, self.prompts.device)
        K, l, d = self.prompts.shape
        # a row gather of the flattened prompts: embedding's backward sums repeated tasks by sorting,
        # deterministic on CUDA, where index_select's backward uses float atomics
        return F.embedding(task_ids, self.prompts.reshape(K, l * d)).view(-1, l, d)

    @torch.no_grad()
    def init_from_text(
        self,
        embeddings: nn.Module | torch.Tensor,
        token_ids: Sequence[int] | torch.Tensor,
        task: int | str | None = None,
    ) -> None:
        """Set the prompt of ``task`` (every task when None) to the embeddings of ``token_ids``,
        repeated or cut to the prompt length. ``embeddings``: the LM's input embedding module (or
        its ``(vocab, d)`` weight)."""
        rows = _text_rows(embeddings, token_ids, self.prompt_len).to(self.prompts)
        if task is None:
            self.prompts.copy_(rows.expand_as(self.prompts))
        else:
            self.prompts[self._resolve_task(task)] = rows

    @torch.no_grad()
    def add_task(self, init: str | int = "random", *, name: str | None = None) -> int:
        """Append a task and return its id. ``init``: ``"random"`` (``N(0, init_std²)``),
        ``"average"`` (mean of the existing prompts) or an existing task id to copy. Other tasks keep
        their values bit for bit, but ``prompts`` becomes a new Parameter: rebuild the optimizer."""
        p = self.prompts
        if init == "random":
            row = torch.randn(p.shape[1:], dtype=p.dtype, device=p.device) * self.init_std
        elif init == "average":
            row = p.float().mean(0)
        elif isinstance(init, int) and not isinstance(init, bool):
            row = p[self._resolve_task(init)].clone()
        else:
            raise ValueError(f"init must be 'random', 'average' or a task id, got {init!r}")
        self._next_name(name)
        self.prompts = _grown(p, row)
        return self.num_tasks - 1

    @torch.no_grad()
    def to_peft(self, directory: str | os.PathLike, task: int | str = 0, **kwargs) -> str:
        """Write task ``task``'s prompt as a one-task PEFT MultitaskPromptTuning adapter (the format
        ``mptkern serve`` and :meth:`MultitaskPrompt.from_peft` read): shared prompt = this prompt,
        rank-1 factors all ones, so ``P ∘ (u vᵀ)`` is the prompt bit for bit. ``kwargs`` go to
        :meth:`MultitaskPrompt.to_peft`; returns the directory."""
        i = self._resolve_task(task)
        rows = self.prompts[i]
        names = [self.task_names[i]] if self.task_names is not None else None
        one = MultitaskPrompt(1, self.prompt_len, self.hidden_size, 1, task_names=names, dtype=rows.dtype,
                              device=rows.device)
        one.prompt_embeddings.copy_(rows)
        one.prefix_task_cols.fill_(1)
        one.prefix_task_rows.fill_(1)
        return one.to_peft(directory, **kwargs)


# ----------------------------------------------------------------------------------------------
# MultitaskPrompt
# ----------------------------------------------------------------------------------------------
class MultitaskPrompt(_PromptModule):
    """Shared prompt scaled per task by a rank-r matrix (MPT's decomposed student prompt).

    Args:
        num_tasks: K. prompt_len: l. hidden_size: d. rank: r (1 in the papers).
        task_names: optional K unique names (see :meth:`task_index`).
        init: random init, ``"near_ones"`` (default; ``U V`` starts near all-ones so each prompt
            starts near ``P*``) or ``"peft"`` (PEFT's RANDOM init, same draws for the same seed).
        backend: passed to :func:`mptkern.ops.decomposed_prompts`.
        dtype, device: of the parameters (default: torch's defaults).

    Parameters ``prompt_embeddings (l, d)``, ``prefix_task_cols (K, l, r)``, ``prefix_task_rows
    (K, r, d)`` (PEFT's names). ``forward(task_ids (B,) int) -> (B, l, d)`` in their dtype.

    Example::

        source = MultitaskPrompt(8, 100, 576, task_names=[...])       # trained on 8 source tasks
        target = MultitaskPrompt.from_source(source, "average_source_tasks")
        target.to_peft("adapter/", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    """

    _per_task_params = ("prefix_task_cols", "prefix_task_rows")

    def __init__(
        self,
        num_tasks: int,
        prompt_len: int,
        hidden_size: int,
        rank: int = 1,
        *,
        task_names: Sequence[str] | None = None,
        init: str = "near_ones",
        backend: str = "auto",
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ):
        super().__init__()
        if min(num_tasks, prompt_len, hidden_size, rank) < 1:
            sizes = (num_tasks, prompt_len, hidden_size, rank)
            raise ValueError(f"num_tasks, prompt_len, hidden_size, rank must be >= 1, got {sizes}")
        if init not in RANDOM_INITS:
            raise ValueError(f"init must be one of {RANDOM_INITS}, got {init!r}")
        self._init_names(task_names, num_tasks)
        self.init = init
        self.backend = backend
        kw = dict(dtype=dtype, device=device)
        if init == "peft":  # nn.Embedding's N(0, 1), then PEFT's draws for the factors, in its order
            shared = nn.init.normal_(torch.empty(prompt_len, hidden_size, **kw))
        else:
            shared = torch.randn(prompt_len, hidden_size, **kw) * 0.02
        self.prompt_embeddings = nn.Parameter(shared)
        cols, rows = self._random_factors(num_tasks, prompt_len, rank, hidden_size, **kw)
        self.prefix_task_cols = nn.Parameter(cols)
        self.prefix_task_rows = nn.Parameter(rows)

    def _random_factors(self, K: int, l: int, r: int, d: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
        if self.init == "peft":
            return torch.normal(0.0, 0.02, (K, l, r), **kw), torch.normal(0.0, 0.02, (K, r, d), **kw)
        # U V starts at the all-ones matrix plus noise, so each task's prompt starts near P*
        return 1 + 0.02 * torch.randn(K, l, r, **kw), 1 / r + 0.02 * torch.randn(K, r, d, **kw)

    @property
    def prompt_len(self) -> int:
        return self.prompt_embeddings.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.prompt_embeddings.shape[1]

    @property
    def rank(self) -> int:
        return self.prefix_task_cols.shape[2]

    def _config(self) -> dict:
        return dict(num_tasks=self.num_tasks, prompt_len=self.prompt_len, hidden_size=self.hidden_size,
                    rank=self.rank, task_names=self.task_names, init=self.init)

    def extra_repr(self) -> str:
        return (f"num_tasks={self.num_tasks}, prompt_len={self.prompt_len}, hidden_size={self.hidden_size}, "
                f"rank={self.rank}")

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(task_ids, torch.Tensor):
            raise TypeError(f"task_ids must be an integer tensor of shape (B,), got {type(task_ids).__name__}")
        return decomposed_prompts(
            self.prompt_embeddings, self.prefix_task_cols, self.prefix_task_rows, task_ids, backend=self.backend
        )

    def write_rows(self, task_ids: torch.Tensor, out: torch.Tensor, row_offsets: torch.Tensor) -> torch.Tensor:
        """The fused op writes the prompt rows straight into ``out``: no intermediate prompts tensor."""
        return decomposed_prompts(self.prompt_embeddings, self.prefix_task_cols, self.prefix_task_rows, task_ids,
                                  out=out, row_offsets=row_offsets, backend=self.backend)

    @torch.no_grad()
    def init_from_text(self, embeddings: nn.Module | torch.Tensor, token_ids: Sequence[int] | torch.Tensor) -> None:
        """Set ``P*`` to the embeddings of ``token_ids``, repeated or cut to the prompt length
        (PEFT's TEXT init; ``U, V`` are left as they are). ``embeddings``: the LM's input embedding
        module (or its ``(vocab, d)`` weight)."""
        self.prompt_embeddings.copy_(_text_rows(embeddings, token_ids, self.prompt_len))

    # -- target adaptation --------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_source(
        cls,
        source: MultitaskPrompt,
        mode: str,
        num_tasks: int = 1,
        task: int | str | None = None,
        *,
        task_names: Sequence[str] | None = None,
        init: str | None = None,
        backend: str | None = None,
    ) -> MultitaskPrompt:
        """A new prompt for ``num_tasks`` target tasks initialised from a trained source prompt, with
        PEFT's ``MultitaskPromptTuningInit`` semantics (``mode`` is case-insensitive, so PEFT's enum
        works too):

        * ``"average_source_tasks"``: ``P*`` copied; every task's ``U`` is the mean of the source
          ``U_k`` and its ``V`` the mean of the source ``V_k`` (factors averaged separately, as PEFT
          does, not the products ``U_k V_k``).
        * ``"exact_source_task"``: ``P*`` copied; every task's ``U, V`` copied from source task
          ``task`` (an id or a name).
        * ``"only_source_shared"``: ``P*`` copied; ``U, V`` freshly random (``init``; PEFT keeps its
          random ``N(0, 0.02²)`` factors, which is ``init="peft"``).

        PEFT supports only ``num_tasks=1`` in the first two modes (larger ones fail its
        ``load_state_dict``); here every new task gets the same factors. The result has the
        source's rank, dtype and device; ``init`` and ``backend`` default to the source's.
        """
        mode = str(getattr(mode, "value", mode)).lower()
        if mode not in SOURCE_MODES:
            raise ValueError(f"mode must be one of {SOURCE_MODES}, got {mode!r}")
        if (task is None) != (mode != "exact_source_task"):
            raise ValueError("task is required by 'exact_source_task' and used by no other mode")
        target = cls(
            num_tasks, source.prompt_len, source.hidden_size, source.rank, task_names=task_names,
            init=init or source.init, backend=backend or source.backend, dtype=source.dtype, device=source.device,
        )
        target.prompt_embeddings.copy_(source.prompt_embeddings)
        if mode == "only_source_shared":
            return target
        cols, rows = source.prefix_task_cols, source.prefix_task_rows
        if mode == "average_source_tasks":
            u, v = cols.float().mean(0), rows.float().mean(0)
        else:
            t = source._resolve_task(task)
            u, v = cols[t], rows[t]
        target.prefix_task_cols.copy_(u.expand_as(target.prefix_task_cols))
        target.prefix_task_rows.copy_(v.expand_as(target.prefix_task_rows))
        return target

    @torch.no_grad()
    def add_task(self, init: str | int = "average", *, name: str | None = None) -> int:
        """Append a task sharing ``P*`` and return its id. ``init``: ``"average"`` (mean source
        factors, as ``from_source``'s ``average_source_tasks``), ``"random"`` (the module's random
        init) or an existing task id whose ``U, V`` are copied.

        Other tasks keep their values bit for bit, but ``prefix_task_cols`` and ``prefix_task_rows``
        become new Parameters (gradients dropped): rebuild the optimizer. To adapt to the new task
        without moving the source tasks, train only the new rows (e.g. zero the other rows' grads)
        or keep ``P*`` frozen; training ``P*`` changes every task's prompt.
        """
        cols, rows = self.prefix_task_cols, self.prefix_task_rows
        if init == "average":
            u, v = cols.float().mean(0), rows.float().mean(0)
        elif init == "random":
            u, v = (x[0] for x in self._random_factors(1, self.prompt_len, self.rank, self.hidden_size,
                                                         dtype=cols.dtype, device=cols.device))
        elif isinstance(init, int) and not isinstance(init, bool):
            t = self._resolve_task(init)
            u, v = cols[t].clone(), rows[t].clone()
        else:
            raise ValueError(f"init must be 'average', 'random' or a task id, got {init!r}")
        self._next_name(name)
        self.prefix_task_cols = _grown(cols, u)
        self.prefix_task_rows = _grown(rows, v)
        return self.num_tasks - 1

    # -- PEFT interop -------------------------------------------------------------------------
    def to_peft(
        self,
        directory: str | os.PathLike,
        *,
        base_model_name_or_path: str | None = None,
        task_type: str = "CAUSAL_LM",
        num_layers: int | None = None,
        num_attention_heads: int | None = None,
        instructions: Mapping[str, str] | None = None,
    ) -> str:
        """Write a PEFT MultitaskPromptTuning adapter that ``peft.PeftModel.from_pretrained(base,
        directory)`` loads: ``adapter_model.safetensors`` (keys ``prompt_embeddings``,
        ``prefix_task_cols``, ``prefix_task_rows``, no prefix, as PEFT saves prompt learning
        methods) and ``adapter_config.json``. Each file is written atomically; returns the directory.

        The config says ``prompt_tuning_init="RANDOM"``: PEFT re-runs a source-task init on every
        load, so naming a source file there would make the adapter depend on it. ``num_layers`` and
        ``num_attention_heads`` may stay None (PEFT fills them from the base model). Task names
        and ``instructions`` (task name -> the instruction its inputs were formatted with in
        training, :class:`mptkern.data.InputFormat`) travel in the safetensors metadata, which PEFT
        ignores; :func:`read_peft_instructions` reads them back, and the inference engine formats
        text requests with them.
        """
        task_type = str(getattr(task_type, "value", task_type))
        if task_type not in PEFT_TASK_TYPES:
            raise ValueError(
                f"task_type must be one of {PEFT_TASK_TYPES} (one transformer submodule), got {task_type!r}"
            )
        directory = os.fspath(directory)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        metadata = {"format": "pt"}
        if self._task_names is not None:
            metadata["mptkern.task_names"] = json.dumps(self._task_names)
        if instructions:
            if self._task_names is None or set(instructions) - set(self._task_names):
                raise ValueError(f"instructions name tasks {sorted(instructions)} but the module's tasks are "
                                 f"{self._task_names}")
            if not all(isinstance(v, str) for v in instructions.values()):
                raise TypeError("instructions must map task names to strings")
            metadata["mptkern.instructions"] = json.dumps(dict(instructions))
            metadata["mptkern.input_format"] = INPUT_FORMAT
        config = {
            "auto_mapping": None,
            "base_model_name_or_path": base_model_name_or_path,
            "inference_mode": True,
            "modules_to_save": None,
            "num_attention_heads": num_attention_heads,
            "num_layers": num_layers,
            "num_ranks": self.rank,
            "num_tasks": self.num_tasks,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": self.prompt_len,
            "peft_type": PEFT_TYPE,
            "peft_version": _peft_version(),
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_state_dict_path": None,
            "prompt_tuning_init_task": 0,
            "prompt_tuning_init_text": None,
            "revision": None,
            "task_type": task_type,
            "token_dim": self.hidden_size,
            "tokenizer_kwargs": None,
            "tokenizer_name_or_path": None,
        }
        os.makedirs(directory, exist_ok=True)
        _atomic_write(os.path.join(directory, PEFT_WEIGHTS_NAME),
                      lambda tmp: save_file(tensors, tmp, metadata=metadata))
        _atomic_write(os.path.join(directory, PEFT_CONFIG_NAME), _write_text(json.dumps(config, indent=2) + "\n"))
        return directory

    @classmethod
    def from_peft(
        cls,
        directory: str | os.PathLike,
        *,
        task_names: Sequence[str] | None = None,
        device: str | torch.device | None = None,
        backend: str = "auto",
    ) -> MultitaskPrompt:
        """Read a PEFT MultitaskPromptTuning adapter directory (``adapter_config.json`` plus
        ``adapter_model.safetensors``, or the older ``adapter_model.bin``). The config's init fields
        are ignored: the weights are the adapter. Task names come from ``task_names``, else from
        metadata written by :meth:`to_peft`, else none. Dtype as stored, on ``device`` (CPU)."""
        directory = os.fspath(directory)
        with open(os.path.join(directory, PEFT_CONFIG_NAME), encoding="utf-8") as f:
            config = json.load(f)
        if config.get("peft_type") != PEFT_TYPE:
            raise ValueError(f"{directory} holds a {config.get('peft_type')} adapter, not {PEFT_TYPE}")
        submodules = config.get("num_transformer_submodules")
        if submodules is None:
            submodules = 2 if config.get("task_type") == "SEQ_2_SEQ_LM" else 1
        if submodules != 1:
            raise ValueError(
                f"{directory}: num_transformer_submodules={submodules}; only 1 (decoder prompts) is supported"
            )
        weights = os.path.join(directory, PEFT_WEIGHTS_NAME)
        if os.path.exists(weights):
            tensors, metadata = _read_safetensors(weights, device)
        else:
            tensors = torch.load(os.path.join(directory, "adapter_model.bin"), map_location=device or "cpu",
                                 weights_only=True)
            metadata = {}
        keys = ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows")
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise ValueError(f"{directory}: adapter weights lack {missing} (found {sorted(tensors)})")
        tensors = {k: tensors[k] for k in keys}
        (l, d), (K, _, r) = tensors["prompt_embeddings"].shape, tensors["prefix_task_cols"].shape
        declared = {k: config.get(k) for k in ("num_virtual_tokens", "token_dim", "num_tasks", "num_ranks")}
        found = dict(num_virtual_tokens=l, token_dim=d, num_tasks=K, num_ranks=r)
        if any(v is not None and v != found[k] for k, v in declared.items()):
            raise ValueError(f"{directory}: config says {declared} but the weights have {found}")
        if task_names is None and "mptkern.task_names" in metadata:
            task_names = json.loads(metadata["mptkern.task_names"])
        config = dict(num_tasks=K, prompt_len=l, hidden_size=d, rank=r, task_names=task_names)
        return cls._from_tensors(tensors, config, backend=backend)


def read_peft_instructions(directory: str | os.PathLike) -> dict[str, str]:
    """Task name -> instruction recorded in a PEFT adapter written by :meth:`MultitaskPrompt.to_peft`
    (empty for adapters that record none). Raises ValueError for an input format this version does
    not know."""
    path = os.path.join(os.fspath(directory), PEFT_WEIGHTS_NAME)
    if not os.path.exists(path):
        return {}
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    if "mptkern.instructions" not in metadata:
        return {}
    if metadata.get("mptkern.input_format") != INPUT_FORMAT:
        raise ValueError(f"{os.fspath(directory)}: input format {metadata.get('mptkern.input_format')!r} is not "
                         f"{INPUT_FORMAT!r}, the one this mptkern formats requests with")
    return json.loads(metadata["mptkern.instructions"])


def _peft_version() -> str | None:
    """The installed PEFT's version for the adapter config (None lets PEFT fill its own)."""
    from importlib import metadata

    try:
        return metadata.version("peft")
    except metadata.PackageNotFoundError:
        return None
