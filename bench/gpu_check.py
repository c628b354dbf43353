"""The GPU proof in one command: environment, CUDA oracle tests, every benchmark, CSVs and a plot.

    bash bench/gpu_check.sh             # a CUDA machine: at most 8 minutes on one H200
    bash bench/gpu_check.sh --dry-run   # anywhere: CPU, tiny shapes, TRITON_INTERPRET=1 (~2 minutes)
    bash bench/gpu_check.sh --only env,tests,report   # some stages (the others are reported as not selected)

Stages, in the order they run, each under its own time cap (``CAPS``; printed first). A stage that
fails or outruns its cap is recorded and the next one runs; the exit status is 1 if any failed.

  build (background from the start, joined before ``tests``): csrc/ with the image's nvcc through
      the documented CMake + Ninja build, for the GPU's own architecture, into mptkern/_mptkern_C.so
      (ptxas errors on spills), then a check that it loads; skipped without nvcc/cmake/ninja or CUDA
  env: ``mptkern env`` (versions, device, which backends can run and why not)
  prefix_attention: bench_prefix_attention.py, D=128 (Hq/Hkv 32/8): dense and shared-prefix
      (l=100, 8 tasks, 64 sequences) fwd and fwd+bwd against SDPA flash over the concatenated
      sequences, decode at batch 1/16/64/256 against SDPA on the materialised cache
  distill_loss: bench_distill_loss.py at N=8192, d=4096, V=128256, bf16, against eager full logits
      (and Liger-Kernel where it is installed; the benchmark prints why it is skipped otherwise)
  train_step, shared_prefix, engine: the model-level benchmarks on a random-weight Llama of
      Llama-3.2-1B's shape (harness.MODEL_SIZES["1b"], no download), bf16
  tests: the CUDA tests (pytest -k float16: bf16 and fp16) of tests/test_gpu_check.py (every op and
      backend against tests/reference.py's float64 oracles) and tests/test_decomposed_prompts.py,
      tests/test_distill_loss.py (device-aware), the cuda backend included once ``build`` loaded
  prompt_embed: bench_prompt_embed.py at B=64, l=100, d=4096, K=21 against PEFT's eager op (after
      the build, so the cuda backend is a contender)
  report: kernels.csv and models.csv (every benchmark row, one column ``bench``), summary.csv (each
      figure as a ratio to its anchor, achieved TB/s or TFLOP/s and its fraction of the H200's peak),
      stages.csv, speedups.png; with gpu_check.log and tests.xml that is 7 files in the output folder

Output folder: ``--out``, else ``$OUT``, else bench/results/gpu (a dry run: a new temporary folder).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

# H200 SXM peaks from the vendor's datasheet, as the device notes of the workplace this was written
# in quote them (H200.md): HBM3e 4.8 TB/s; dense bf16 (and fp16) matrix math about 990 TFLOP/s.
# The same notes measured one H200 at about 4.3 TB/s (device-to-device copy, bytes read + written)
# and 769-798 TFLOP/s (8192^3 bf16 matmul, random data); the kernel benchmarks measure both
# ceilings again in their own run (copy_gbs, matmul_tflops), and the summary gives both fractions.
PEAK_TBS = 4.8
PEAK_TFLOPS = 990.0

BUDGET_S = 480  # 8 minutes on one H200, all stages together
# seconds per stage; ``build`` runs in the background beside the GPU stages and is not in the sum
CAPS = {"build": 150, "env": 15, "prefix_attention": 60, "distill_loss": 55, "train_step": 55,
        "shared_prefix": 60, "engine": 75, "tests": 80, "prompt_embed": 35, "report": 20}
MODEL_SIZE = {False: "1b", True: "tiny"}  # model benchmarks: GPU run, dry run
# model FLOPs per real input (or generated) token, in units of the parameter count P (a forward is
# 2P; the frozen model's backward computes input gradients only, another 2P; attention and prompt
# rows are not counted): distillation step = teacher fwd + student fwd + bwd; prompt-tuning step =
# fwd + bwd; decode = fwd
MODEL_FLOPS_PER_TOKEN = {"train_step": 6, "shared_prefix": 4, "engine": 2}
# (module, package, where it is a contender): each benchmark leaves it out when it is not installed
OPTIONAL_ANCHORS = [("liger_kernel", "liger-kernel", "distill_loss"),
                    ("flash_attn", "flash-attn", "prefix_attention: varlen and kvcache")]
KERNEL_BENCHES = ("prompt_embed", "prefix_attention", "distill_loss")
MODEL_BENCHES = ("train_step", "shared_prefix", "engine")


@dataclass
class Stage:
    name: str
    cap: float
    what: str
    cmd: list[str] | None = None  # run as a subprocess (its own process group, killed at the cap)
    fn: Callable[[], None] | None = None  # run in this process under an alarm
    background: bool = False  # started before the first stage, joined before a stage that names it
    after: str | None = None  # a background stage to join first
    skip: str | None = None  # why it does not run here


@dataclass
class Context:
    dry: bool
    py: str
    out: Path
    work: Path
    env: dict
    summary: list = field(default_factory=list)  # the report's rows, printed last


class Log:
    """Every line to stdout and to ``gpu_check.log`` in the output folder."""

    def __init__(self, path: Path):
        self.file = path.open("a", encoding="utf-8")
        self.lock = threading.Lock()

    def line(self, text: str = "") -> None:
        with self.lock:
            print(text, flush=True)
            self.file.write(text + "\n")
            self.file.flush()


def _kill(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def _start(cmd, ctx: Context, log: Log | None, sink=None) -> tuple[subprocess.Popen, threading.Thread]:
    """Start ``cmd`` in its own process group; a thread copies its output to ``log`` (or ``sink``)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ctx.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)

    def pump():
        for raw in proc.stdout:
            if sink is not None:
                sink.write(raw)
                sink.flush()
            else:
                log.line(raw.rstrip("\n"))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return proc, thread


def _finish(proc, thread, timeout: float) -> str:
    try:
        rc = proc.wait(timeout=max(timeout, 0.01))
        status = "ok" if rc == 0 else f"FAILED (exit {rc})"
    except subprocess.TimeoutExpired:
        _kill(proc)
        status = "TIMEOUT"
    thread.join(timeout=5)
    return status


class _Alarm(Exception):
    pass


def _run_fn(fn, cap: float) -> str:
    def on_alarm(signum, frame):
        raise _Alarm()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, cap)
    try:
        fn()
        return "ok"
    except _Alarm:
        return "TIMEOUT"
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        import traceback

        traceback.print_exc()
        return f"FAILED ({type(exc).__name__}: {exc})"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------------------------
# the stages
# ----------------------------------------------------------------------------------------------
def _bench(ctx: Context, name: str, *args) -> list[str]:
    return [ctx.py, str(BENCH / f"bench_{name}.py"), *map(str, args), "--out", str(ctx.work / f"{name}.csv")]


def _cuda_arch() -> str:
    """The GPU's compute capability as CMake writes it (``90`` on an H100/H200), from nvidia-smi."""
    try:
        cap = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.split()[0]
        return cap.replace(".", "")
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "90"


def _build_skip(ctx: Context) -> str | None:
    if ctx.dry:
        return "dry run: the csrc/ build is left to the GPU run (tests/test_csrc_build.py compiles it wherever nvcc is)"
    missing = [t for t in ("nvcc", "cmake", "ninja") if shutil.which(t, path=ctx.env.get("PATH")) is None]
    if missing:
        return f"{', '.join(missing)} not on PATH: the cuda backend is not built or tested"
    return None


def build_stages(ctx: Context) -> list[Stage]:
    dry, py = ctx.dry, ctx.py
    size = MODEL_SIZE[dry]
    arch = "" if dry else _cuda_arch()
    bdir, q = shlex.quote(str(ROOT / "build" / "gpu-check")), shlex.quote(py)
    load = "import sys; from mptkern import _ext; sys.exit(0 if _ext.loaded() else 'not loaded: ' + _ext.why_not())"
    build = (f"set -e; cmake -S . -B {bdir} -G Ninja -DMPTKERN_CUDA_ARCHS={arch} -DPython3_EXECUTABLE={q}; "
             f"cmake --build {bdir}; {q} -c {shlex.quote(load)}; echo 'mptkern/_mptkern_C.so built for sm_{arch} and loaded'")
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", f"--junitxml={ctx.out / 'tests.xml'}"]
    if dry:
        tests += ["tests/test_gpu_check.py", "-k", "float16"]
    else:
        if importlib.util.find_spec("xdist") is not None:
            tests += ["-n", "4"]  # Triton compiles each kernel variant on the CPU: 4 processes share that
        tests += ["tests/test_gpu_check.py", "tests/test_decomposed_prompts.py", "tests/test_distill_loss.py", "-k", "float16"]
    if dry:
        kernels = dict(
            prefix_attention=_bench(ctx, "prefix_attention", "--device", "cpu"),
            distill_loss=_bench(ctx, "distill_loss", "--device", "cpu", "--dtype", "fp32", "--N", 64, "--d", 32,
                                "--V", 300, "--no-compile", "--warmup", 1, "--rep", 5, "--rounds", 1),
            prompt_embed=_bench(ctx, "prompt_embed", "--device", "cpu", "--dtype", "fp32", "--B", 2, "--l", 4, "--d", 32,
                                "--K", 3, "--warmup", 1, "--rep", 5),
        )
        small = ["--device", "cpu", "--model-size", size, "--K", 2, "--l", 4, "--min-len", 4, "--max-len", 8]
        models = dict(
            train_step=_bench(ctx, "train_step", *small, "--B", 2),
            shared_prefix=_bench(ctx, "shared_prefix", *small, "--B", 2),
            engine=_bench(ctx, "engine", *small, "--R", 2, "--min-new", 2, "--max-new", 4, "--concurrency", "1,4",
                          "--max-running", 4, "--hf-batch", 4, "--check", 2, "--max-batch-tokens", 64, "--loose-check"),
        )
    else:
        kernels = dict(
            prefix_attention=_bench(ctx, "prefix_attention", "--device", "cuda", "--dtype", "bf16", "--head-dims", 128,
                                    "--decode-batches", 1, 16, 64, 256, "--no-flex", "--warmup", 10, "--rep", 40),
            distill_loss=_bench(ctx, "distill_loss", "--device", "cuda", "--dtype", "bf16", "--N", 8192, "--d", 4096,
                                "--V", 128256, "--no-compile", "--warmup", 10, "--rep", 50, "--rounds", 1),
            prompt_embed=_bench(ctx, "prompt_embed", "--device", "cuda", "--dtype", "bf16", "--B", 64, "--l", 100,
                                "--d", 4096, "--K", 21, "--r", 1, "--warmup", 10, "--rep", 50),
        )
        big = ["--device", "cuda", "--dtype", "bfloat16", "--model-size", size, "--K", 8, "--l", 100]
        models = dict(
            train_step=_bench(ctx, "train_step", *big, "--B", 16),
            shared_prefix=_bench(ctx, "shared_prefix", *big, "--B", 32),
            engine=_bench(ctx, "engine", *big, "--R", 8, "--concurrency", "1,16,64", "--max-running", 64,
                          "--check", 4, "--loose-check"),
        )
    c = CAPS
    return [
        Stage("build", c["build"], f"csrc/ with nvcc for sm_{arch or '?'} (CMake + Ninja), then load it", cmd=["bash", "-c", build],
              background=True, skip=_build_skip(ctx)),
        Stage("env", c["env"], "mptkern env", cmd=[py, "-m", "mptkern.cli", "env"]),
        Stage("prefix_attention", c["prefix_attention"], "prefix attention fwd, fwd+bwd, decode vs SDPA flash",
              cmd=kernels["prefix_attention"]),
        Stage("distill_loss", c["distill_loss"], "fused distillation loss vs full logits (and Liger)", cmd=kernels["distill_loss"]),
        Stage("train_step", c["train_step"], f"distillation step, random Llama-{size}, vs PEFT", cmd=models["train_step"]),
        Stage("shared_prefix", c["shared_prefix"], f"prompt-tuning step, random Llama-{size}, vs PEFT",
              cmd=models["shared_prefix"]),
        Stage("engine", c["engine"], f"multi-task engine, random Llama-{size}, vs HF generate", cmd=models["engine"]),
        Stage("tests", c["tests"], "CUDA tests against the float64 oracles, bf16 and fp16", cmd=tests, after="build"),
        Stage("prompt_embed", c["prompt_embed"], "decomposed prompts vs PEFT's eager op", cmd=kernels["prompt_embed"],
              after="build"),
        Stage("report", c["report"], "merged CSVs, summary, plot", fn=lambda: report(ctx)),
    ]


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------
def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _write(path: Path, rows: list[dict], lead: list[str] = ()) -> None:
    cols = list(lead)
    for r in rows:
        cols += [k for k in r if k not in cols]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        w.writerows(rows)


def _num(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def summarize(bench: str, rows: list[dict], model_size: str | None = None) -> list[dict]:
    """One summary row per timed figure of a contender that is not the anchor: the ratio to the
    anchor (time or throughput, >1 is faster), achieved TB/s or TFLOP/s and their fractions."""
    import harness

    out = []
    for r in rows:
        c = r["contender"]
        frac_ceiling = None
        if bench == "prompt_embed":
            anchor, ratio, label = "peft", r.get("speedup_vs_peft"), f"{r['mode']} B={r['B']} l={r['l']} d={r['d']} K={r['K']}"
            achieved, unit, peak, frac_ceiling = _num(r.get("gbs")), "TB/s", PEAK_TBS, _num(r.get("frac_copy"))
            achieved = None if achieved is None else achieved / 1e3
        elif bench == "prefix_attention":
            anchor = "sdpa-materialised" if r["mode"] == "decode" else ("sdpa-flash-materialised" if r["scenario"].startswith("shared") else "sdpa-flash")
            ratio = r.get("speedup_vs_sdpa")
            if r["mode"] == "decode":
                label = f"{r['scenario']} D={r['head_dim']} B={r['batch']}"
                achieved, unit, peak = _num(r.get("gbs")), "TB/s", PEAK_TBS
                achieved = None if achieved is None else achieved / 1e3
            else:
                label = f"{r['scenario']} {r['mode']} D={r['head_dim']}"
                achieved, unit, peak, frac_ceiling = _num(r.get("tflops")), "TFLOP/s", PEAK_TFLOPS, _num(r.get("frac_matmul"))
        elif bench == "distill_loss":
            anchor, ratio, label = "eager", r.get("speedup_vs_eager"), f"{r['mode']} N={r['N']} d={r['d']} V={r['V']}"
            achieved, unit, peak, frac_ceiling = _num(r.get("tflops")), "TFLOP/s", PEAK_TFLOPS, _num(r.get("frac_matmul"))
        elif bench in ("train_step", "shared_prefix"):
            anchor = "peft" if bench == "train_step" else "peft-mpt"
            ratio, label = r.get("speedup_vs_peft"), f"{r['op']} B={r['B']} K={r['K']} l={r['l']}"
            unit, peak = "TFLOP/s (model)", PEAK_TFLOPS
            tps = _num(r.get("tokens_per_s"))
            achieved = None if tps is None or not model_size else MODEL_FLOPS_PER_TOKEN[bench] * harness.model_params(model_size) * tps / 1e12
        elif bench == "engine":
            anchor, ratio, label = "hf-generate", r.get("throughput_vs_hf"), f"{r['requests']} requests over {r['K']} tasks"
            unit, peak = "TFLOP/s (model)", PEAK_TFLOPS
            tps = _num(r.get("tokens_per_s"))
            achieved = None if tps is None or not model_size else MODEL_FLOPS_PER_TOKEN[bench] * harness.model_params(model_size) * tps / 1e12
        else:
            raise ValueError(bench)
        if c == anchor or _num(ratio) is None:
            continue
        out.append(dict(bench=bench, figure=label, contender=c, anchor=anchor, ratio=round(float(ratio), 3),
                        achieved="" if achieved is None else _sig(achieved), unit=unit,
                        frac_of_h200_peak="" if achieved is None else _sig(achieved / peak),
                        frac_of_measured_ceiling="" if frac_ceiling is None else frac_ceiling,
                        device=r.get("device", ""), commit=r.get("commit", ""), date=r.get("date", "")))
    return out


def report(ctx: Context, log: Log | None = None) -> None:
    say = log.line if log else print
    summary = []
    for group, benches in (("kernels", KERNEL_BENCHES), ("models", MODEL_BENCHES)):
        merged = []
        for b in benches:
            rows = _read(ctx.work / f"{b}.csv")
            size = MODEL_SIZE[ctx.dry] if b in MODEL_BENCHES else None
            for r in rows:
                merged.append({"bench": b, **({"model": f"random-llama-{size}"} if size else {}), **r})
            summary += summarize(b, rows, size)
            if not rows:
                why = "CPU: agreement checked, timing refused" if ctx.dry and b == "prefix_attention" else "no rows (stage failed?)"
                say(f"[gpu-check] {b}: {why}")
        _write(ctx.out / f"{group}.csv", merged, ["bench"])
    if ctx.dry:
        for r in summary:  # a CPU figure is no fraction of a GPU's peak
            r["frac_of_h200_peak"] = ""
    _write(ctx.out / "summary.csv", summary, ["bench", "figure", "contender", "anchor", "ratio"])
    try:
        import plot

        mine = [r for r in summary if r["contender"].startswith("mptkern")]
        title = ("DRY RUN (CPU, tiny shapes): " if ctx.dry else "") + "mptkern vs each anchor (>1: faster)"
        if mine:
            plot.plot_ratios(mine, ctx.out / "speedups.png", title)
    except Exception as exc:  # noqa: BLE001 - a missing matplotlib costs the plot, not the CSVs
        say(f"[gpu-check] no plot: {type(exc).__name__}: {exc}")
    ctx.summary = summary


def print_summary(summary: list[dict], dry: bool, log: Log) -> None:
    log.line("")
    log.line("figure                                           contender                 anchor                    ratio  "
             "achieved             of H200 peak  of ceiling")
    for r in summary:
        ach = f"{r['achieved']:.4g} {r['unit']}" if r["achieved"] != "" else "-"
        peak = f"{100 * r['frac_of_h200_peak']:.1f}%" if r["frac_of_h200_peak"] != "" else "-"
        ceil = f"{100 * float(r['frac_of_measured_ceiling']):.1f}%" if r["frac_of_measured_ceiling"] != "" else "-"
        log.line(f"{(r['bench'] + ' ' + r['figure'])[:48]:<48} {r['contender'][:25]:<25} {r['anchor'][:25]:<25} "
                 f"{r['ratio']:>5.2f}x {ach:<20} {peak:>12}  {ceil:>10}")
    log.line(f"peaks: H200 datasheet {PEAK_TBS} TB/s HBM3e, ~{PEAK_TFLOPS:.0f} TFLOP/s dense bf16; 'of ceiling': of the "
             "copy bandwidth or bf16 matmul rate the benchmark measured in the same run; model TFLOP/s: "
             + ", ".join(f"{k} {v}P" for k, v in MODEL_FLOPS_PER_TOKEN.items())
             + " FLOPs per token, P the parameter count (attention scores not counted)")
    if dry:
        log.line("DRY RUN: CPU, tiny shapes, Triton in the interpreter: no figure above is a GPU result")


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def make_context(args) -> Context:
    dry = args.dry_run
    out = Path(args.out or os.environ.get("OUT") or (tempfile.mkdtemp(prefix="gpu-check-dry-") if dry else ROOT / "bench/results/gpu"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-work-"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPTKERN_GPU_CHECK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(BENCH), *filter(None, [os.environ.get("PYTHONPATH")])])
    # the interpreter's own scripts (pip's cmake and ninja) and CUDA's usual home, where nvcc is not on PATH
    extra = [str(Path(sys.executable).parent)] + (["/usr/local/cuda/bin"] if Path("/usr/local/cuda/bin/nvcc").is_file() else [])
    env["PATH"] = os.pathsep.join([*extra, env.get("PATH", "")])
    if dry:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    return Context(dry=dry, py=sys.executable, out=out, work=work, env=env)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, TRITON_INTERPRET=1; output to a temporary folder unless OUT/--out")
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else bench/results/gpu)")
    p.add_argument("--only", default=None, help="comma-separated stages to run (report always runs)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(BENCH))
    ctx = make_context(args)
    log = Log(ctx.out / "gpu_check.log")
    stages = build_stages(ctx)
    only = set(args.only.split(",")) if args.only else None
    if only and (unknown := only - {s.name for s in stages}):
        log.line(f"unknown stages {sorted(unknown)}; stages are {[s.name for s in stages]}")
        return 2
    for s in stages:
        if only and s.name not in only and s.name != "report" and s.skip is None:
            s.skip = "not selected (--only)"
    t_start = time.monotonic()
    mode = "DRY RUN (CPU, tiny shapes, TRITON_INTERPRET=1)" if ctx.dry else "GPU run"
    log.line(f"[gpu-check] {mode}; output {ctx.out}; python {ctx.py}")
    for mod, pkg, anchor in OPTIONAL_ANCHORS:
        have = importlib.util.find_spec(mod) is not None
        log.line(f"[gpu-check] optional anchor {pkg} ({anchor}): " + ("installed, timed" if have else "not installed, skipped"))
    if not ctx.dry and shutil.which("nvidia-smi", path=ctx.env.get("PATH")) is None:
        log.line("[gpu-check] WARNING: no nvidia-smi on PATH: is this a CUDA machine? (--dry-run runs on CPU)")
    log.line(f"[gpu-check] budget {BUDGET_S} s in all; per stage (a stage over its cap is stopped and recorded):")
    for s in stages:
        note = " (background, beside the stages below)" if s.background else ""
        log.line(f"[gpu-check]   {s.name:<17} cap {s.cap:>4.0f} s  {s.what}{note}" + (f"  [skip: {s.skip}]" if s.skip else ""))
    fg = sum(s.cap for s in stages if not s.background)
    log.line(f"[gpu-check]   sequential caps: {fg:.0f} s of {BUDGET_S} s")

    results: dict[str, tuple[str, float]] = {}
    running: dict[str, tuple] = {}
    for s in stages:
        if s.background and s.skip is None:
            sink = (ctx.work / f"{s.name}.log").open("w")
            proc, thread = _start(s.cmd, ctx, None, sink=sink)
            timer = threading.Timer(s.cap, _kill, [proc])  # its cap holds while the other stages run
            timer.daemon = True
            timer.start()
            running[s.name] = (s, proc, thread, time.monotonic(), sink, timer)
            log.line(f"[gpu-check] BEGIN {s.name} in the background (cap {s.cap:.0f} s)")

    def join(name):
        s, proc, thread, t0, sink, timer = running.pop(name)
        status = _finish(proc, thread, s.cap - (time.monotonic() - t0))
        timer.cancel()
        if time.monotonic() - t0 >= s.cap and status != "ok":
            status = "TIMEOUT"
        sink.close()
        log.line(f"[gpu-check] --- output of {name} ---")
        for line in (ctx.work / f"{name}.log").read_text(errors="replace").splitlines():
            log.line(line)
        results[name] = (status, time.monotonic() - t0)
        log.line(f"[gpu-check] END {name}: {status} in {results[name][1]:.1f} s (cap {s.cap:.0f} s)")

    for s in stages:
        if s.background:
            if s.skip is not None:
                results[s.name] = (f"skipped: {s.skip}", 0.0)
                log.line(f"[gpu-check] END {s.name}: skipped: {s.skip}")
            continue
        if s.after in running:
            join(s.after)
        if s.skip is not None:
            results[s.name] = (f"skipped: {s.skip}", 0.0)
            log.line(f"[gpu-check] END {s.name}: skipped: {s.skip}")
            continue
        log.line(f"[gpu-check] BEGIN {s.name} (cap {s.cap:.0f} s, {time.monotonic() - t_start:.0f} s into the run): {s.what}")
        t0 = time.monotonic()
        if s.cmd is not None:
            log.line("[gpu-check] $ " + " ".join(s.cmd))
            status = _finish(*_start(s.cmd, ctx, log), s.cap)
        else:
            status = _run_fn(s.fn, s.cap)
        results[s.name] = (status, time.monotonic() - t0)
        log.line(f"[gpu-check] END {s.name}: {status} in {results[s.name][1]:.1f} s (cap {s.cap:.0f} s)")
    for name in list(running):
        join(name)

    total = time.monotonic() - t_start
    caps = {s.name: s.cap for s in stages}
    whats = {s.name: s.what for s in stages}
    stage_rows = [dict(stage=n, status=st, seconds=round(sec, 1), cap_s=caps[n], what=whats[n]) for n, (st, sec) in results.items()]
    _write(ctx.out / "stages.csv", stage_rows)
    print_summary(ctx.summary, ctx.dry, log)
    log.line("")
    log.line(f"{'stage':<17} {'status':<60} {'s':>6} {'cap':>5}")
    for r in stage_rows:
        log.line(f"{r['stage']:<17} {r['status'][:60]:<60} {r['seconds']:>6} {r['cap_s']:>5.0f}")
    failed = [n for n, (st, _) in results.items() if not (st == "ok" or st.startswith("skipped"))]
    files = sorted(f.name for f in ctx.out.iterdir())
    log.line(f"[gpu-check] {len(files)} files in {ctx.out}: {', '.join(files)}")
    log.line(f"[gpu-check] total {total:.0f} s (budget {BUDGET_S} s); "
             + (f"FAILED: {', '.join(failed)}" if failed else "every stage that ran passed"))
    shutil.rmtree(ctx.work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
