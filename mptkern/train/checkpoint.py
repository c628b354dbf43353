"""Checkpoints written atomically: a stage's state goes to a temporary file in the same folder,
is flushed to disk, then renamed over the old one, so a crash leaves the previous checkpoint whole.

A checkpoint holds plain data only (tensors, and dicts, lists, tuples, strings, numbers, booleans
and None of them), checked when it is saved, and is read back with ``torch.load(...,
weights_only=True)``: loading one never runs pickled code. The trainer's checkpoints also hold
``"fingerprint"``, :func:`mptkern.train.config.config_fingerprint` of the config that wrote them;
``load_checkpoint(path, fingerprint=...)`` refuses one written under a different config.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings
from pathlib import Path

import torch

from mptkern.train.config import fingerprint_changes

_PLAIN = (str, int, float, bool, type(None))


def _check_plain(value, where: str) -> None:
    """Raise TypeError naming the first part of ``value`` that ``weights_only`` loading would refuse."""
    if isinstance(value, torch.Tensor) or isinstance(value, _PLAIN):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint key {where}[{key!r}] is a {type(key).__name__}; keys must be str or int")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    raise TypeError(f"checkpoint value {where} is a {type(value).__module__}.{type(value).__qualname__}; "
                    "only tensors and plain dicts/lists/tuples/strings/numbers/None load with weights_only=True")


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write ``state`` (tensors, state dicts, plain values) to ``path`` atomically. Anything that
    would not load with ``weights_only=True`` (an object of a custom class) is a TypeError, and
    nothing is written."""
    _check_plain(state, "state")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, fingerprint: dict | None = None) -> dict | None:
    """The state saved at ``path`` (loaded with ``weights_only=True``), or None when there is none.

    ``fingerprint``: the current config's :func:`~mptkern.train.config.config_fingerprint`. A
    checkpoint written under a config that differs in any counted key is a ValueError naming each
    key with its value in the checkpoint and now; one written before checkpoints recorded their
    config loads with a warning (nothing to compare)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds objects beyond tensors and plain values, which weights_only=True "
                         f"loading refuses (not a checkpoint of this version?): {e}. Delete it, or use another "
                         "output_dir, to train this stage afresh") from e
    if fingerprint is None:
        return state
    if not isinstance(state, dict) or "fingerprint" not in state:
        warnings.warn(f"{path} was written before checkpoints recorded their config: resuming from it "
                      "without checking that the config is the same", stacklevel=2)
        return state
    changes = fingerprint_changes(state["fingerprint"]["config"], fingerprint["config"])
    if changes:
        listed = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in changes)
        raise ValueError(f"{path} was written under a different config, so this run cannot resume from it; "
                         f"differing keys: {listed}. Use another output_dir, or set these keys back")
    return state
