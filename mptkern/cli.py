"""Command line: `mptkern demo | env | aot | bench NAME`."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path


def _demo(args) -> int:
    from mptkern import demo

    res = demo.run(steps=args.steps, prompt_len=args.prompt_len, batch_size=args.batch_size, seed=args.seed, device=args.device)
    print(demo.format_table(res))
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
    p = sub.add_parser("demo", help="multitask prompt tuning on the embedded SmolLM2 and synthetic clinical tasks")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.set_defaults(fn=_demo)
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
