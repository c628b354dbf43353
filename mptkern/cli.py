"""Command line: `mptkern demo | train | eval | env | aot | bench NAME`."""

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
    from mptkern.train import MPTTrainer, load_config

    trainer = MPTTrainer(load_config(args.config))
    print(MPTTrainer.format_results(trainer.run()))
    return 0


def _eval(args) -> int:
    from mptkern.prompts import MultitaskPrompt
    from mptkern.train import MPTTrainer, TrainConfig, load_config

    config = load_config(args.config) if args.config else TrainConfig()
    trainer = MPTTrainer(config)
    prompt = MultitaskPrompt.from_peft(args.adapter, device=trainer.device).to(trainer.dtype)
    names = prompt.task_names or [t.name for t in trainer.sources]
    tasks = {t.name: t for t in trainer.sources + trainer.targets}
    for i, name in enumerate(names):
        if name not in tasks:
            print(f"{name}: no such task in the configured data", file=sys.stderr)
            continue
        one = MultitaskPrompt.from_source(prompt, "exact_source_task", num_tasks=1, task=i)
        res = trainer.evaluate(one, tasks[name])
        print(f"{name:<20} {res['metric']:<9} {res['score']:.3f}  (n={res['n']})")
    return 0


def _env(args) -> int:
    from mptkern.env import format_report

    print(format_report())
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mptkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="the MPT recipe on the embedded SmolLM2 and the synthetic clinical suite")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.set_defaults(fn=_demo)
    p = sub.add_parser("train", help="run the MPT recipe from a YAML/JSON config")
    p.add_argument("--config", required=True)
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
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
