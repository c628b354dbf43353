"""Loader of the csrc/ extension ``mptkern/_mptkern_C.so`` (ops under ``torch.ops.mptkern_C``).

The library is looked for in one place, next to this file, where CMake writes it. Importing this
module never raises; ``loaded()`` tries once and ``why_not()`` says what was tried.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

BUILD_COMMAND = "cmake -S . -B build -G Ninja && cmake --build build"
_HINT = f"build it with: {BUILD_COMMAND} (run in the repository root; needs nvcc and a CUDA build of torch)"
_OPS = ("decomposed_prompts_fwd", "decomposed_prompts_bwd")


def path() -> Path:
    """Where the extension is looked for: ``mptkern/_mptkern_C.so`` in this package."""
    return Path(__file__).resolve().with_name("_mptkern_C.so")


@functools.cache
def _load() -> str | None:
    """Loads the library once; returns None on success, else the reason it is unavailable."""
    lib = path()
    if not lib.is_file():
        return f"{lib} not found; {_HINT}"
    try:
        torch.ops.load_library(str(lib))
    except Exception as exc:  # a stale or mismatched build (ABI, CUDA) must be reported, not hidden
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""  # torch keeps the dlopen error here
        return f"{lib} exists but failed to load: {exc}{cause}; rebuild it: {BUILD_COMMAND}"
    missing = [op for op in _OPS if not hasattr(torch.ops.mptkern_C, op)]
    if missing:
        return f"{lib} loaded but lacks ops {missing} (stale build?); rebuild it: {BUILD_COMMAND}"
    return None


def loaded() -> bool:
    """True when ``_mptkern_C.so`` is loaded and its ops are registered (tried once, then cached)."""
    return _load() is None


def why_not() -> str:
    """Why the extension is unavailable (path tried, existence, load error, build command); '' when loaded."""
    return _load() or ""


def require() -> None:
    """Raise RuntimeError(why_not()) unless the extension is loaded.

    Example: ``_ext.require(); torch.ops.mptkern_C.decomposed_prompts_fwd(S, C, R, ids, offs, out)``
    """
    if not loaded():
        raise RuntimeError(why_not())
