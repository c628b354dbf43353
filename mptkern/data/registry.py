"""The dataset registry: which clinical datasets make the source and target tasks, and how to read them.

``registry.yaml`` (beside this file) lists the kinds of source and target datasets of the paper's
clinical setting, each with its task type, reader, label schema, output format, instruction and the
paths of its files relative to a user-provided data root. No dataset ships with mptkern;
:func:`load_registry` reads the copies a user holds::

    from mptkern.data import load_registry
    suite = load_registry(None, "/data/clinical", names=["mednli", "n2c2_2018_med_ner"])
    suite["sources"][0].train[0].target
"""

from __future__ import annotations

import dataclasses
import inspect
import random
from collections.abc import Sequence
from pathlib import Path

import yaml

from mptkern.data.readers import READERS
from mptkern.data.schema import TASK_TYPES, Task

__all__ = ["RegistryEntry", "registry_path", "read_registry", "missing_files", "load_registry"]

_ROLES = ("source", "target")
_REQUIRED = ("name", "role", "type", "reader", "paths", "labels", "output_format", "instruction")
_OPTIONAL = ("dataset", "evidence", "options", "eval_fraction")


@dataclasses.dataclass(frozen=True)
class RegistryEntry:
    """One registry task: see the header of ``registry.yaml`` for the meaning of each key."""

    name: str
    role: str
    type: str
    reader: str
    paths: dict
    labels: tuple[str, ...]
    output_format: str
    instruction: str
    dataset: str = ""
    evidence: str = ""
    options: dict = dataclasses.field(default_factory=dict)
    eval_fraction: float = 0.1

    def resolve(self, data_root) -> dict[str, Path]:
        """``{"train": Path, "eval": Path}`` (eval only when given) under ``data_root``."""
        return {split: Path(data_root) / rel for split, rel in self.paths.items()}


def registry_path() -> Path:
    """Path of the registry file shipped with mptkern (``mptkern/data/registry.yaml``)."""
    return Path(__file__).with_name("registry.yaml")


def read_registry(path=None) -> list[RegistryEntry]:
    """Parse and validate a registry file (default: :func:`registry_path`).

    Returns:
        ``list[RegistryEntry]`` in file order. Raises ValueError naming the file and the entry for a
        missing or unknown key, an unknown reader/type/role, a duplicate name or a bad ``paths``.
    """
    path = Path(path) if path is not None else registry_path()
    if not path.is_file():
        hint = (" (the installed package lacks its data file: package it with [tool.setuptools.package-data] "
                "\"mptkern.data\" = [\"registry.yaml\"])" if path == registry_path() else "")
        raise FileNotFoundError(f"{path}: no such registry file{hint}")
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), list):
        raise ValueError(f"{path}: expected a mapping with a 'tasks' list")
    entries, seen = [], set()
    for i, raw in enumerate(doc["tasks"]):
        where = f"{path}: task #{i + 1}" + (f" ({raw.get('name')!r})" if isinstance(raw, dict) else "")
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a mapping")
        missing = [k for k in _REQUIRED if k not in raw]
        unknown = [k for k in raw if k not in _REQUIRED + _OPTIONAL]
        if missing or unknown:
            raise ValueError(f"{where}: missing keys {missing}, unknown keys {unknown}")
        if raw["name"] in seen:
            raise ValueError(f"{where}: duplicate name")
        seen.add(raw["name"])
        if raw["role"] not in _ROLES:
            raise ValueError(f"{where}: role must be one of {_ROLES}")
        if raw["type"] not in TASK_TYPES:
            raise ValueError(f"{where}: type must be one of {TASK_TYPES}")
        if raw["reader"] not in READERS:
            raise ValueError(f"{where}: reader must be one of {sorted(READERS)}")
        paths = raw["paths"]
        if not isinstance(paths, dict) or "train" not in paths or set(paths) - {"train", "eval"}:
            raise ValueError(f"{where}: paths must be a mapping with 'train' and optionally 'eval'")
        try:  # reader options are keyword arguments of the reader: check them before any file is read
            inspect.signature(READERS[raw["reader"]]).bind("path", "task", **(raw.get("options") or {}))
        except TypeError as exc:
            raise ValueError(f"{where}: options do not fit reader {raw['reader']!r}: {exc}") from None
        entries.append(RegistryEntry(
            name=raw["name"], role=raw["role"], type=raw["type"], reader=raw["reader"],
            paths={k: str(v) for k, v in paths.items()}, labels=tuple(str(x) for x in raw["labels"] or ()),
            output_format=raw["output_format"], instruction=raw["instruction"], dataset=raw.get("dataset", ""),
            evidence=raw.get("evidence", ""), options=dict(raw.get("options") or {}),
            eval_fraction=float(raw.get("eval_fraction", 0.1)),
        ))
    return entries


def _select(entries, names, roles):
    if names is not None:
        known = {e.name for e in entries}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise KeyError(f"unknown registry tasks {unknown}; known: {sorted(known)}")
        entries = [e for e in entries if e.name in set(names)]
    return [e for e in entries if e.role in roles]


def missing_files(entries: Sequence[RegistryEntry], data_root) -> list[str]:
    """``"<task> <split>: <path>"`` for every path of ``entries`` that does not exist under ``data_root``."""
    return [f"{e.name} {split}: {p}" for e in entries for split, p in e.resolve(data_root).items() if not p.exists()]


def load_registry(path=None, data_root=".", *, names: Sequence[str] | None = None,
                  roles: Sequence[str] = _ROLES, seed: int = 0) -> dict[str, list[Task]]:
    """Read the registry's datasets from ``data_root`` into tasks with train/eval examples.

    Args:
        path: registry file (None: the one shipped with mptkern).
        data_root: directory the entries' ``paths`` are relative to.
        names: load only these entries (default: all of ``roles``).
        roles: ``"source"`` and/or ``"target"``.
        seed: seeds the hold-out split of entries that give no ``eval`` path.

    Every file is checked before any is read: when some are missing, FileNotFoundError lists all of
    them. Reader errors name the file and line (:class:`~mptkern.data.readers.DataFormatError`).

    Returns:
        ``{"sources": [Task, ...], "targets": [Task, ...]}`` in registry order, like
        :func:`mptkern.data.make_suite`; each task's ``meta`` has ``registry``, ``dataset``, ``evidence``.
    """
    for r in roles:
        if r not in _ROLES:
            raise ValueError(f"roles must be among {_ROLES}, got {r!r}")
    entries = _select(read_registry(path), names, tuple(roles))
    missing = missing_files(entries, data_root)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} registry path(s) missing under data root {str(data_root)!r} (no dataset ships with "
            "mptkern; point data_root at your copies or edit the registry's paths):\n  " + "\n  ".join(missing)
        )
    out: dict[str, list[Task]] = {"sources": [], "targets": []}
    for e in entries:
        task = Task(e.name, e.type, e.instruction, e.labels, e.output_format,
                    meta={"registry": e.name, "dataset": e.dataset, "evidence": e.evidence, "reader": e.reader})
        reader = READERS[e.reader]
        files = e.resolve(data_root)
        task.train = reader(files["train"], task, **e.options)
        if "eval" in files:
            task.eval = reader(files["eval"], task, **e.options)
        if "eval" not in files and len(task.train) > 1:
            order = list(range(len(task.train)))
            random.Random(f"{seed}:{e.name}").shuffle(order)
            n_eval = max(1, round(e.eval_fraction * len(order)))
            held = set(order[:n_eval])
            task.eval = [x for i, x in enumerate(task.train) if i in held]
            task.train = [x for i, x in enumerate(task.train) if i not in held]
        out["sources" if e.role == "source" else "targets"].append(task)
    return out
