"""The one benchmark harness: timing, peak memory, ceilings measured in the same run, CSV rows.

Every benchmark in bench/ builds its inputs outside the timed closure, times it with :func:`time_fn`,
divides by a ceiling from :func:`copy_bandwidth` or :func:`matmul_tflops` taken in the same process,
and appends rows with :func:`append_rows`, which stamps each row with :func:`env_fields`.
Scripts here are run as ``python bench/<name>.py``, so this module is imported as ``harness``.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

VERSIONED = ("torch", "triton", "transformers", "peft", "liger-kernel")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Disagreement(AssertionError):
    """A contender's result differs from the reference contender's: it is not timed."""
ROOT = Path(__file__).resolve().parent.parent


def time_fn(fn, *, device, warmup: float = 25, rep: float = 100) -> float:
    """Median wall time of one ``fn()`` call, in ms. ``warmup`` and ``rep`` are time budgets in ms.

    CUDA: ``triton.testing.do_bench(..., return_mode="median")``, which synchronizes around each
    call and flushes L2 between calls, so each call reads its inputs from HBM.
    CPU: one call to estimate its length, then ``warmup`` ms of untimed calls and at least 5 (about
    ``rep`` ms of) calls timed one by one with ``perf_counter``; the median of those.
    """
    if torch.device(device).type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    t0 = time.perf_counter()
    fn()
    est_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(int(warmup / est_ms)):
        fn()
    times = []
    for _ in range(max(5, int(rep / est_ms))):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_memory(fn, device) -> int | None:
    """Bytes one ``fn()`` call needs at its peak, above what was in use before it.

    CUDA: caching-allocator counters (outputs freed on return still count). CPU (Linux): the
    process's resident-set high-water mark, reset through ``/proc/self/clear_refs`` before the call,
    minus the resident set before it; it counts every allocation, torch's or not. None elsewhere."""
    if torch.device(device).type != "cuda":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            before = _rss_kib("VmRSS")
        except OSError:
            return None
        fn()
        return (_rss_kib("VmHWM") - before) * 1024
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def copy_bandwidth(device, nbytes: int | None = None) -> float:
    """GB/s (1e9 B/s) of ``dst.copy_(src)`` on ``device``, counting bytes read plus bytes written.
    Default size: 1 GiB on CUDA, 256 MiB on CPU (both far beyond the last-level cache)."""
    device = torch.device(device)
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)
    ms = time_fn(lambda: dst.copy_(src), device=device, warmup=50, rep=300)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(device, dtype: torch.dtype | None = None, n: int | None = None) -> float:
    """TFLOP/s (2 n^3 flops per call) of an ``n x n`` matmul: bf16, n = 8192 on CUDA by default;
    fp32, n = 2048 on CPU."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    n = n or (8192 if cuda else 2048)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = time_fn(lambda: a @ b, device=device, warmup=50, rep=300)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def device_name(device) -> str:
    """GPU name, or the CPU model with its core count and torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def git_commit() -> str:
    """Short HEAD, with ``+dirty`` when tracked or untracked (non-ignored) files differ from it.
    bench/results/ is left out of the check, so appending results does not dirty the next run.
    ``$MPTKERN_COMMIT``, when set, is returned instead: set it where the tree is a copy without
    .git (as on a GPU machine that runs bench/gpu_check.sh over a copied checkout)."""
    if os.environ.get("MPTKERN_COMMIT"):
        return os.environ["MPTKERN_COMMIT"]

    def git(*args):
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=all", "--", ".", ":(exclude)bench/results")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def env_fields(device) -> dict:
    """The columns every results row carries: date (UTC), device, commit, package and Python versions."""
    fields = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "commit": git_commit(),
    }
    for pkg in VERSIONED:
        try:
            fields[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            fields[pkg] = ""
    fields["python"] = platform.python_version()
    return fields


def append_rows(csv_path, rows: list[dict], device) -> Path:
    """Append ``rows`` (dicts with identical keys) to ``csv_path``, each prefixed with
    :func:`env_fields` of ``device``. Writes the header for a new file; raises ValueError when an
    existing file's header differs, instead of writing misaligned columns."""
    if not rows:
        return Path(csv_path)
    env = env_fields(device)
    rows = [{**env, **r} for r in rows]
    header = list(rows[0])
    for r in rows:
        if list(r) != header:
            raise ValueError(f"rows have different columns: {list(r)} vs {header}")
    path = Path(csv_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            old = next(csv.reader(f), [])
        if old != header:
            raise ValueError(
                f"{path} has columns {old}, these rows have {header}: write to a new file or move the old one"
            )
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        if new:
            w.writeheader()
        w.writerows(rows)
    return path


def run_isolated(script: str, argv: list[str], contenders) -> dict:
    """Run ``script --only NAME`` once per contender, each in a fresh process (so peak memory is its
    own), and collect the JSON dict each prints as its last line."""
    import json
    import sys

    results = {}
    for name in contenders:
        proc = subprocess.run([sys.executable, script, *argv, "--only", name], capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name} failed")
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


# ----------------------------------------------------------------------------------------------
# models for the model-level benchmarks (bench_shared_prefix, bench_train_step, bench_engine)
# ----------------------------------------------------------------------------------------------
# Random-weight Llama-architecture configs, built without any download. "1b" has the shape of
# Llama-3.2-1B (hidden 2048, 16 layers, 32 query / 8 key-value heads of 64, MLP 8192, vocab 128256,
# tied embeddings, RoPE theta 5e5; its llama3 RoPE scaling is left out, which changes no cost).
MODEL_SIZES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=True, max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=True,
                 max_position_embeddings=1024),
}


class ByteTokenizer:
    """Stand-in tokenizer for the random-weight models: UTF-8 bytes as ids 3..258 (0 pad, 1 bos,
    2 eos, the ids a default ``LlamaConfig`` names). Enough for the engine and the benchmarks, which
    only encode synthetic inputs and decode outputs."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    OFFSET = 3

    def encode(self, text, add_special_tokens=False):
        return [b + self.OFFSET for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens=True):
        data = bytes(int(i) - self.OFFSET for i in ids if self.OFFSET <= int(i) < self.OFFSET + 256)
        return data.decode("utf-8", errors="replace")


def model_params(size: str) -> int:
    """Parameter count of ``MODEL_SIZES[size]`` (tied embeddings counted once): the ``P`` of the
    ``2 P`` FLOPs per token of a forward pass (attention scores not counted)."""
    c = MODEL_SIZES[size]
    d, hd, L, V = c["hidden_size"], c["head_dim"], c["num_hidden_layers"], c["vocab_size"]
    attn = d * hd * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    mlp = 3 * d * c["intermediate_size"]
    return L * (attn + mlp + 2 * d) + V * d + d


def random_llama(size: str, *, device="cpu", dtype=torch.float32, seed: int = 0):
    """``(model, tokenizer)``: a ``LlamaForCausalLM`` of ``MODEL_SIZES[size]`` with random weights
    (transformers' init, seeded), built on ``device`` in ``dtype`` (RoPE buffers stay float32),
    frozen and in eval mode like :func:`mptkern.models.load_default`'s, and a :class:`ByteTokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**MODEL_SIZES[size], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False), ByteTokenizer()


def load_model(model_size: str | None, *, device="cpu", dtype=torch.float32):
    """``(model, tokenizer, label)``: the embedded SmolLM2-135M-Instruct when ``model_size`` is None,
    else :func:`random_llama` of that size."""
    if model_size is None:
        from mptkern.models import load_default

        model, tok = load_default(device=device, dtype=dtype)
        return model, tok, "SmolLM2-135M"
    model, tok = random_llama(model_size, device=device, dtype=dtype)
    n = model_params(model_size)
    return model, tok, f"random Llama-{model_size} ({n / 1e9:.2f}B)" if n >= 1e8 else f"random Llama-{model_size} ({n / 1e6:.2f}M)"
