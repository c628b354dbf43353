"""Re-score the k=8 MPT and prompt-tuning runs of a `mptkern train --config examples/public.yaml` run
from the PEFT adapters it exported, and save their greedy texts (generations_k8_prompts.json).

    python bench/results/public/regenerate_k8.py --data-root DIR --run-dir runs/public

The run that made this folder's results predates ``generations.jsonl``; this rebuilt its texts. The
scores it prints equal the run's (checked run by run), which also shows the exported adapters are
the trained prompts.
"""

import argparse
import collections
import json
import warnings

from mptkern.data import load_registry
from mptkern.models import load_default
from mptkern.prompts import MultitaskPrompt
from mptkern.train import load_config
from mptkern.train.evaluation import EvalRun, evaluate_runs

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data-root", required=True)
parser.add_argument("--run-dir", required=True)
parser.add_argument("--config", default="examples/public.yaml")
parser.add_argument("--out", default="bench/results/public/generations_k8_prompts.json")
args = parser.parse_args()
cfg = load_config(args.config)
warnings.simplefilter("ignore")
model, tok = load_default()
suite = load_registry(cfg.data.registry, args.data_root, names=cfg.data.tasks, roles=("target",), seed=cfg.data.synthetic_seed,
                      limit=cfg.data.limit, eval_limit=cfg.data.eval_limit)
runs = [EvalRun(name, t, (MultitaskPrompt.from_peft(f"{args.run_dir}/adapters/{name}"), 0))
        for t in suite["targets"] for m in ("mpt", "prompt_tuning") for seed in cfg.target_init.seeds
        for name in [f"target-{t.name}-k8-s{seed}-{m}"]]
res = evaluate_runs(model, tok, runs, max_new_tokens=cfg.max_new_tokens, max_length=cfg.max_length, progress=False)
for r in runs:
    common = collections.Counter(t.strip()[:40] for t in res[r.name]["texts"]).most_common(3)
    print(f"{r.name:<45} {res[r.name]['score']:.3f}  {common}")
with open(args.out, "w") as f:
    json.dump({r.name: {"score": res[r.name]["score"], "texts": res[r.name]["texts"]} for r in runs}, f, indent=0)
