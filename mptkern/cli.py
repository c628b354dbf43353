"""Command line: `mptkern demo | train | eval | env | aot | bench NAME | serve`."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path


def _demo(args) -> int:
    from mptkern import demo

    print(demo.run(demo.demo_config(args.output_dir, args.device)))
    return 0


def _train(args) -> int:
    import dataclasses

    from mptkern import demo
    from mptkern.train import load_config

    config = load_config(args.config)
    overrides = {k: v for k, v in (("data_root", args.data_root), ("limit", args.limit),
                                   ("eval_limit", args.eval_limit)) if v is not None}
    if overrides:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, **overrides))
    if args.output_dir is not None:
        config = dataclasses.replace(config, output_dir=args.output_dir)
    print(demo.run(config, announce=lambda text: print(text, flush=True)))
    return 0


def _eval(args) -> int:
    from mptkern.prompts import MultitaskPrompt
    from mptkern.train import MPTTrainer, TrainConfig, load_config
    from mptkern.train.evaluation import EvalRun, evaluate_runs

    config = load_config(args.config) if args.config else TrainConfig()
    trainer = MPTTrainer(config)
    prompt = MultitaskPrompt.from_peft(args.adapter, device=trainer.device).to(trainer.dtype)
    names = prompt.task_names or [t.name for t in trainer.sources]
    tasks = {t.name: t for t in trainer.sources + trainer.targets}
    for name in names:
        if name not in tasks:
            print(f"{name}: no such task in the configured data", file=sys.stderr)
    runs = [EvalRun(name, tasks[name], (prompt, i)) for i, name in enumerate(names) if name in tasks]
    scores = evaluate_runs(trainer.model, trainer.tokenizer, runs, max_new_tokens=config.max_new_tokens,
                           max_length=config.max_length, max_running=config.eval_max_running)
    for run in runs:  # every task's requests in one engine call
        res = scores[run.name]
        print(f"{run.name:<20} {res['metric']:<9} {res['score']:.3f}  (n={res['n']})")
    return 0


def _env(args) -> int:
    from mptkern.env import format_report, warn_untested

    print(format_report())
    warn_untested()
    return 0


def _aot(args) -> int:
    from mptkern import aot

    return aot.main()


def _bench(args) -> int:
    script = Path(__file__).resolve().parent.parent / "bench" / f"bench_{args.name}.py"
    if not script.is_file():
        print(f"no benchmark {script} (benchmarks run from a source checkout of mptkern)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _load_model_dir(directory: str, device: str):
    """A Hugging Face causal LM folder (offline) whose model_type the registry knows -> (model, tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from mptkern.models.registry import REGISTRY

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    if config.model_type not in REGISTRY:
        raise ValueError(f"{directory}: model_type {config.model_type!r} is not supported; supported types: "
                         f"{sorted(REGISTRY)} (mptkern/models/registry.py)")
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).to(device)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model.requires_grad_(False).eval(), tokenizer


def _serve(args) -> int:
    from mptkern.serve.server import require_serve_stack

    require_serve_stack()  # before loading anything: one line naming the pip command
    import torch

    from mptkern.models import load_default
    from mptkern.prompts import MultitaskPrompt, read_peft_instructions
    from mptkern.serve import MultiTaskEngine, serve

    prompts, instructions = {}, {}
    if args.adapter:
        module = MultitaskPrompt.from_peft(args.adapter)
        names = module.task_names or ([f"task{i}" for i in range(module.num_tasks)] if module.num_tasks > 1 else ["default"])
        prompts.update({name: (module, i) for i, name in enumerate(names)})
        instructions = {k: v for k, v in read_peft_instructions(args.adapter).items() if k in prompts}
    for spec in args.task:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            print(f"--task expects NAME=DIR, got {spec!r}", file=sys.stderr)
            return 2
        if name in prompts:
            print(f"task {name!r} given twice", file=sys.stderr)
            return 2
        prompts[name] = directory
    if not prompts:
        print("give --adapter DIR and/or --task NAME=DIR", file=sys.stderr)
        return 2
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.model:
        try:
            model, tokenizer = _load_model_dir(args.model, device)
        except (OSError, ValueError) as exc:
            print(f"mptkern serve: cannot load --model {args.model}: {exc}", file=sys.stderr)
            return 2
    else:
        model, tokenizer = load_default(device=device)
    paging = {k: v for k, v in (("kv_memory", args.kv_memory), ("block_size", args.block_size)) if v is not None}
    engine = MultiTaskEngine(model, tokenizer, prompts, max_batch_tokens=args.max_batch_tokens,
                             max_running=args.max_running, max_seq_len=args.max_seq_len, instructions=instructions,
                             **paging)
    serve(engine, args.host, args.port, max_queue=args.max_queue, max_body=args.max_body, max_batch=args.max_batch,
          drain_timeout=args.drain_timeout, default_max_tokens=args.default_max_tokens)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mptkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="the MPT recipe on the embedded SmolLM2 and the synthetic clinical suite")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.set_defaults(fn=_demo)
    p = sub.add_parser("train", help="run the MPT recipe from a YAML/JSON config")
    p.add_argument("--config", required=True)
    p.add_argument("--data-root", default=None, help="folder the registry's paths are relative to (overrides data.data_root)")
    p.add_argument("--limit", type=int, default=None, help="at most N training examples per task (overrides data.limit)")
    p.add_argument("--eval-limit", type=int, default=None, help="at most N eval examples per task (overrides data.eval_limit)")
    p.add_argument("--output-dir", default=None, help="overrides output_dir")
    p.set_defaults(fn=_train)
    p = sub.add_parser("eval", help="evaluate a MultitaskPrompt PEFT adapter on its tasks' eval sets")
    p.add_argument("--adapter", required=True, help="folder with adapter_model.safetensors + adapter_config.json")
    p.add_argument("--config", default=None, help="config naming the model and data (default: embedded model, synthetic suite)")
    p.set_defaults(fn=_eval)
    sub.add_parser("env", help="versions, device and usable backends").set_defaults(fn=_env)
    sub.add_parser("aot", help="compile every Triton kernel configuration for sm_80/sm_90").set_defaults(fn=_aot)
    p = sub.add_parser("bench", help="run bench/bench_NAME.py from a source checkout")
    p.add_argument("name")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=_bench)
    p = sub.add_parser("serve", help="serve task prompts over an OpenAI-compatible HTTP API (FastAPI + uvicorn)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a Hugging Face causal LM folder (offline; its model_type must be in mptkern/models/registry.py); "
                        "default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--adapter", default=None, help="MultitaskPrompt PEFT adapter folder; every named task is served")
    p.add_argument("--task", action="append", default=[], metavar="NAME=DIR", help="a one-task PEFT adapter (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--max-batch-tokens", type=int, default=512)
    p.add_argument("--max-running", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--kv-memory", type=float, default=None, metavar="GIB",
                   help="GiB of paged K/V blocks (default: the engine's)")
    p.add_argument("--block-size", type=int, default=None, help="token positions per K/V block (default: the engine's)")
    p.add_argument("--max-queue", type=int, default=256, help="choices waiting for the engine at most; more get 429")
    p.add_argument("--max-batch", type=int, default=64, help="requests in the engine at once at most")
    p.add_argument("--max-body", type=int, default=1 << 20, help="request body bytes at most; more get 413")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds Ctrl-C lets accepted requests finish before the rest get 503")
    p.add_argument("--default-max-tokens", type=int, default=16, help="max_tokens of a request that gives none")
    p.set_defaults(fn=_serve)
    args = parser.parse_args(argv)
    from mptkern._optional import MissingDependency

    try:
        return args.fn(args)
    except MissingDependency as exc:  # an optional package: one line, not a traceback
        print(f"mptkern {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
