import collections, json, warnings
warnings.simplefilter("ignore")
from mptkern.data import load_registry
from mptkern.models import load_default
from mptkern.prompts import MultitaskPrompt
from mptkern.train.evaluation import EvalRun, evaluate_runs
model, tok = load_default()
s = load_registry("public", "/work/shared/data/real", names=["nli4ct", "bc5cdr_chem_ner", "mts_dialog"], limit=200, eval_limit=32, seed=0)
runs = []
for t in s["targets"]:
    for m in ("mpt", "prompt_tuning"):
        for seed in (0, 1, 2):
            name = f"target-{t.name}-k8-s{seed}-{m}"
            runs.append(EvalRun(name, t, (MultitaskPrompt.from_peft(f"/tmp/public_run/adapters/{name}"), 0)))
res = evaluate_runs(model, tok, runs, max_new_tokens=48, max_length=256, progress=False)
out = {}
for r in runs:
    texts = res[r.name]["texts"]
    out[r.name] = {"score": res[r.name]["score"], "texts": texts}
    print(r.name, round(res[r.name]["score"], 3), collections.Counter(t.strip()[:40] for t in texts).most_common(4))
json.dump(out, open("/tmp/diag.json", "w"), indent=1)
