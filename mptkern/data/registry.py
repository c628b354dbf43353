"""The dataset registry: which datasets make the source and target tasks, and how to read them.

Two registries ship beside this file, named by :data:`SHIPPED`:

* ``clinical`` (``registry.yaml``): the kinds of source and target datasets of the paper's clinical
  setting (licensed corpora: n2c2/i2b2, MIMIC-derived sets).
* ``public`` (``public_registry.yaml``): public biomedical datasets (NCBI-disease, BC5CDR, DDI,
  PubMedQA, COVID-Fact, NLI4CT, MEDIQA-RRS, MTS-Dialog, MeQSum) in the layout their repositories ship,
  each with its licence as the repository states it; non-commercial and unlicensed ones are flagged
  and a warning names them when they are loaded.

Each entry has its task type, reader, label schema, output format, instruction and the paths of its
files relative to a user-provided data root. No dataset ships with mptkern; :func:`load_registry`
reads the copies a user holds::

    from mptkern.data import load_registry
    suite = load_registry("public", "/data/public", names=["pubmedqa", "bc5cdr_chem_ner"], limit=200)
    suite["sources"][0].train[0].target
"""

from __future__ import annotations

import dataclasses
import inspect
import random
import warnings
from collections.abc import Sequence
from pathlib import Path

import yaml

from mptkern.data.readers import READERS
from mptkern.data.schema import TASK_TYPES, Task

__all__ = ["SHIPPED", "LicenseWarning", "RegistryEntry", "registry_path", "read_registry", "missing_files",
           "load_registry"]

SHIPPED = {"clinical": "registry.yaml", "public": "public_registry.yaml"}
_ROLES = ("source", "target")
_REQUIRED = ("name", "role", "type", "reader", "paths", "labels", "output_format", "instruction")
_OPTIONAL = ("dataset", "evidence", "options", "eval_fraction", "license", "license_flag", "origin")
_LICENSE_FLAGS = ("non-commercial", "unlicensed")


class LicenseWarning(UserWarning):
    """A loaded dataset is non-commercial or states no licence (see its registry entry)."""


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
    license: str = ""  # as the dataset's repository states it
    license_flag: str | None = None  # "non-commercial", "unlicensed" or None
    origin: str = ""  # where the files come from (repository and commit)

    def resolve(self, data_root) -> dict[str, Path]:
        """``{"train": Path, "eval": Path}`` (eval only when given) under ``data_root``."""
        return {split: Path(data_root) / rel for split, rel in self.paths.items()}


def registry_path(name: str = "clinical") -> Path:
    """Path of a registry file shipped with mptkern: ``"clinical"`` (``registry.yaml``) or ``"public"``
    (``public_registry.yaml``)."""
    if name not in SHIPPED:
        raise ValueError(f"no shipped registry {name!r}; shipped: {sorted(SHIPPED)} (or give a file path)")
    return Path(__file__).with_name(SHIPPED[name])


def _registry_file(path) -> Path:
    if path is None:
        return registry_path()
    return registry_path(path) if isinstance(path, str) and path in SHIPPED else Path(path)


def read_registry(path=None) -> list[RegistryEntry]:
    """Parse and validate a registry file: a path, a shipped name (:data:`SHIPPED`), or None for
    ``"clinical"``.

    Returns:
        ``list[RegistryEntry]`` in file order. Raises ValueError naming the file and the entry for a
        missing or unknown key, an unknown reader/type/role, a duplicate name or a bad ``paths``.
    """
    path = _registry_file(path)
    if not path.is_file():
        hint = (" (the installed package lacks its data file: package it with [tool.setuptools.package-data] "
                "\"mptkern.data\" = [\"*.yaml\"])" if path.parent == registry_path().parent else "")
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
        if raw.get("license_flag") not in (None, *_LICENSE_FLAGS):
            raise ValueError(f"{where}: license_flag must be one of {_LICENSE_FLAGS} or absent")
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
            eval_fraction=float(raw.get("eval_fraction", 0.1)), license=str(raw.get("license", "")),
            license_flag=raw.get("license_flag"), origin=str(raw.get("origin", "")),
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


def _sample(examples: list, n: int | None, key: str) -> list:
    """At most ``n`` of ``examples``, a sample seeded by ``key``, in file order (all when n is None)."""
    if n is None or len(examples) <= n:
        return examples
    keep = sorted(random.Random(key).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def load_registry(path=None, data_root=".", *, names: Sequence[str] | None = None,
                  roles: Sequence[str] = _ROLES, seed: int = 0, limit: int | None = None,
                  eval_limit: int | None = None) -> dict[str, list[Task]]:
    """Read the registry's datasets from ``data_root`` into tasks with train/eval examples.

    Args:
        path: registry file, a shipped name (``"clinical"``, ``"public"``), or None (``"clinical"``).
        data_root: directory the entries' ``paths`` are relative to.
        names: load only these entries (default: all of ``roles``).
        roles: ``"source"`` and/or ``"target"``.
        seed: seeds the hold-out split of entries that give no ``eval`` path, and the samples below.
        limit, eval_limit: at most this many train / eval examples per task (a seeded sample, kept in
            file order), to keep a CPU run short; None keeps all.

    Every file is checked before any is read: when some are missing, FileNotFoundError lists all of
    them. Reader errors name the file and line (:class:`~mptkern.data.readers.DataFormatError`).
    Loading a dataset whose entry flags its licence (non-commercial, or none stated) warns with
    :class:`LicenseWarning`.

    Returns:
        ``{"sources": [Task, ...], "targets": [Task, ...]}`` in registry order, like
        :func:`mptkern.data.make_suite`; each task's ``meta`` has ``registry``, ``dataset``, ``evidence``,
        ``reader``, ``license``, ``license_flag``.
    """
    for r in roles:
        if r not in _ROLES:
            raise ValueError(f"roles must be among {_ROLES}, got {r!r}")
    for name, value in (("limit", limit), ("eval_limit", eval_limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    entries = _select(read_registry(path), names, tuple(roles))
    missing = missing_files(entries, data_root)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} registry path(s) missing under data root {str(data_root)!r} (no dataset ships with "
            "mptkern; point data_root at your copies or edit the registry's paths):\n  " + "\n  ".join(missing)
        )
    out: dict[str, list[Task]] = {"sources": [], "targets": []}
    for e in entries:
        if e.license_flag:
            warnings.warn(f"registry task {e.name!r}: {e.dataset or e.name} is {e.license_flag} "
                          f"(licence: {e.license or 'none stated'}); check its terms before you use it",
                          LicenseWarning, stacklevel=2)
        task = Task(e.name, e.type, e.instruction, e.labels, e.output_format,
                    meta={"registry": e.name, "dataset": e.dataset, "evidence": e.evidence, "reader": e.reader,
                          "license": e.license, "license_flag": e.license_flag})
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
        task.train = _sample(task.train, limit, f"{seed}:{e.name}:train")
        task.eval = _sample(task.eval, eval_limit, f"{seed}:{e.name}:eval")
        out["sources" if e.role == "source" else "targets"].append(task)
    return out
