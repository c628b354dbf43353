"""Multi-task serving: ``MultiTaskEngine`` vs Hugging Face ``generate`` with the prompt concatenated, per task groups.

Workload (offline, every request submitted at t = 0): K tasks x R requests on the frozen
SmolLM2-135M-Instruct (``mptkern.models.load_default``), each request's input a synthetic clinical
text (the eval examples' ``source`` text of the first K source tasks of ``mptkern.data.make_suite``,
one suite task per served task) cut to a random length in [min_len, max_len] tokens, greedy decoding
of a random ``max_new_tokens`` in [min_new, max_new] with EOS (``<|im_end|>``) stopping.
The prompt is one random ``MultitaskPrompt`` (K tasks, l rows, rank 1), written as a PEFT
MultitaskPromptTuning adapter (``to_peft``); every contender reads that adapter, so all run the
same prompt values:

  * ``mptkern-engine``: ``MultiTaskEngine(model, tok, MultitaskPrompt.from_peft(adapter))``, all
    requests in one ``generate`` call (continuous batching, each task's prompt K/V computed once);
  * ``hf-generate`` (the baseline every ratio is taken against): requests grouped by task, in
    batches of up to ``--hf-batch``, left padded; ``model.generate(inputs_embeds, attention_mask)``
    on the prompt rows concatenated before the input embeddings (``mptkern.models.concat_prompt``,
    PEFT's layout; positions follow the mask), ``max_new_tokens`` = the largest in the batch; each
    request's output is cut at its own max_new_tokens and after its first EOS (static batching
    keeps decoding finished rows). It depends on transformers alone;
  * ``hf-peft``: the same batches through ``PeftModel.from_pretrained(model, adapter).generate(
    input_ids, attention_mask, task_ids=...)``, timed only when its unbatched outputs equal
    ``hf-generate``'s. With transformers >= 5.24 and peft <= 0.21.2 they do not: transformers renamed
    the cache that ``generate`` hands to ``prepare_inputs_for_generation`` from ``past_key_values``
    to ``cache``, peft still looks for ``past_key_values``, finds none, and re-inserts the prompt
    before every decoded token (the run reports this and leaves hf-peft out).

Before timing, ``--check`` requests (spread over the tasks) are generated one at a time (no padding)
by every contender; the run stops without timing or writing anything if the engine's tokens differ
from ``hf-generate``'s. Compared: the generated token ids, cut after the first EOS (the engine
returns the EOS that ended a request, as HF does) and at max_new_tokens. The batched outputs of the
timed run are compared too and their agreement with the engine is reported: padding changes matmul
shapes, which can flip a near-tie greedy pick, so that is reported, not fatal.

Timed at each ``--concurrency`` level (default 1, 16 and 64 requests submitted at once: the first
N of the task-interleaved stream, so 16 requests span 8 tasks), both contenders side by side in
one run. Measured per contender and level, one timed pass after a warmup (``--repeats`` passes,
median): throughput = tokens generated (what each request asked for, to EOS) per second of the
pass; time to first token (TTFT) and time per output token (TPOT = (finish - first token) /
(tokens - 1)) per request, from the start of the pass, medians over requests. HF per-step times come
from a logits processor called once per decoding step. K/V memory: the engine's peak blocks in
use during the pass (task prefixes included) against what the slab design it replaced allocated for
the same requests (one ``max_len + max_new`` slab per request and each task's prefix K/V twice).
CPU: only ratios count. In the CSV,
``throughput_vs_hf`` is the ratio to the same run's ``hf-generate`` row (rows before 2026-12-03:
to ``hf-peft``, then the only HF contender).

    python bench/bench_engine.py --device cpu --R 8      # 1, 16 and 64 concurrent requests, 8 tasks, l = 100
    python bench/bench_engine.py --small                 # smoke run
    python bench/bench_engine.py --device cuda --dtype bfloat16 --model-size 1b --loose-check   # random Llama-3.2-1B shape

With ``--model-size`` the model is a random-weight Llama (``harness.MODEL_SIZES``, no download) and
the tokenizer a byte-level stand-in. Random weights leave many near-tie greedy picks, which bf16
rounding flips between any two implementations; ``--loose-check`` then reports how many leading
tokens of each check request agree and stops only when the first generated token differs on more
than half of them.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import random
import statistics
import sys
import tempfile
import time

import torch

import harness

BASELINE = "hf-generate"


def make_requests(args, tok, task_names):
    """(task index, token ids, max_new_tokens) per request, tasks interleaved (a mixed stream)."""
    from mptkern.data import make_suite

    suite = make_suite(seed=args.seed, n_train=0, n_eval=max(8, args.R))["sources"]
    if len(suite) < args.K:
        raise SystemExit(f"--K {args.K} > {len(suite)} synthetic source tasks")
    rng = random.Random(args.seed)
    reqs = []
    for i in range(args.R):
        for k in range(args.K):
            ex = suite[k].eval[i % len(suite[k].eval)]
            ids = tok.encode(ex.source, add_special_tokens=False)
            while len(ids) < args.max_len:  # short texts: repeat (never happens for the default lengths)
                ids = ids + ids
            n = rng.randint(args.min_len, args.max_len)
            reqs.append((k, ids[-n:], rng.randint(args.min_new, args.max_new)))  # the end keeps the answer cue
    return reqs


def cut(tokens, max_new, eos_ids):
    tokens = list(tokens)[:max_new]
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens


class StepClock:
    """A logits processor that records the time of every decoding step (it changes nothing)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def hf_run(generate, reqs, args, pad_id, eos_ids, start=None):
    """Group by task, left-pad batches of up to hf_batch; ``generate(ids, mask, task, **kwargs)``
    returns the new tokens ``(b, m)``. Returns per request (tokens, ttft, finish, padding)."""
    from transformers import LogitsProcessorList

    start = time.perf_counter() if start is None else start
    out = [None] * len(reqs)
    by_task = {}
    for i, (k, _, _) in enumerate(reqs):
        by_task.setdefault(k, []).append(i)
    for k, idx in by_task.items():
        for b in range(0, len(idx), args.hf_batch):
            chunk = idx[b : b + args.hf_batch]
            n = max(len(reqs[i][1]) for i in chunk)
            ids = torch.full((len(chunk), n), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), n), dtype=torch.long)
            for r, i in enumerate(chunk):
                t = reqs[i][1]
                ids[r, n - len(t):] = torch.tensor(t)
                mask[r, n - len(t):] = 1
            clock = StepClock()
            with torch.no_grad():
                new = generate(ids, mask, k, max_new_tokens=max(reqs[i][2] for i in chunk), do_sample=False,
                               pad_token_id=pad_id, logits_processor=LogitsProcessorList([clock]))
            for r, i in enumerate(chunk):
                tokens = cut(new[r].tolist(), reqs[i][2], eos_ids)
                out[i] = (tokens, clock.times[0] - start, clock.times[len(tokens) - 1] - start, n - len(reqs[i][1]))
    return out


def hf_generators(model, prompt, peft_model):
    """The two HF contenders as ``generate(ids, mask, task, **kwargs) -> new tokens (b, m)``."""
    from mptkern.models import concat_prompt

    dev = model.device

    def plain(ids, mask, k, **kwargs):
        ids, mask = ids.to(dev), mask.to(dev)
        embeds, full_mask = concat_prompt(prompt(torch.full((len(ids),), k, device=dev)),
                                          model.get_input_embeddings()(ids), mask)
        return model.generate(inputs_embeds=embeds, attention_mask=full_mask, **kwargs)  # new tokens only

    def peft(ids, mask, k, **kwargs):
        ids, mask = ids.to(dev), mask.to(dev)
        gen = peft_model.generate(input_ids=ids, attention_mask=mask, task_ids=torch.full((len(ids),), k, device=dev), **kwargs)
        return gen[:, ids.shape[1]:]  # decoder-only generate returns input + new tokens

    return {BASELINE: plain, "hf-peft": peft}


def engine_run(engine, reqs, task_names):
    from mptkern.serve import Request

    results = engine.generate([Request(task_names[k], input_ids=ids, max_new_tokens=m) for k, ids, m in reqs])
    return [(r.token_ids, r.time_to_first_token, r.total_time, 0) for r in results]


def summarize(runs, seconds):
    tokens = sum(len(t) for t, _, _, _ in runs)
    ttft = statistics.median(f for _, f, _, _ in runs)
    tpot = statistics.median((end - f) / (len(t) - 1) for t, f, end, _ in runs if len(t) > 1)
    return dict(tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds, ttft_ms=ttft * 1e3, tpot_ms=tpot * 1e3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu (fp32); cuda runs the same comparison")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--K", type=int, default=8, help="tasks")
    p.add_argument("--R", type=int, default=32, help="requests per task")
    p.add_argument("--l", type=int, default=100, help="prompt rows per task (the paper's 100)")
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--min-new", type=int, default=16)
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--hf-batch", type=int, default=32,
                   help="HF: requests per generate call (one task each); 32 ran faster than 16 on CPU (results/engine.csv)")
    p.add_argument("--max-running", type=int, default=256, help="engine: requests admitted at once")
    p.add_argument("--concurrency", default="1,16,64",
                   help="comma-separated request counts, each timed on its own (the first N of the task-interleaved "
                        "stream); empty: all K x R requests at once")
    p.add_argument("--max-batch-tokens", type=int, default=2048, help="engine: stream rows per step")
    p.add_argument("--check", type=int, default=8, help="requests verified one by one before timing")
    p.add_argument("--repeats", type=int, default=1, help="timed passes per contender (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true", help="smoke run: 2 tasks x 4 requests, 8 new tokens")
    p.add_argument("--model-size", choices=sorted(harness.MODEL_SIZES), default=None,
                   help="a random-weight Llama of this size (harness.MODEL_SIZES) instead of the embedded SmolLM2-135M")
    p.add_argument("--loose-check", action="store_true",
                   help="check: report agreeing leading tokens; stop only if most first tokens differ (random weights)")
    p.add_argument("--out", default=str(harness.ROOT / "bench" / "results" / "engine_concurrency.csv"),
                   help="CSV to append to (engine.csv holds the rows before the concurrency levels)")
    args = p.parse_args(argv)
    if args.small:
        args.K, args.R, args.l, args.min_new, args.max_new, args.check, args.hf_batch = 2, 4, 8, 4, 8, 2, 4
        args.max_running, args.concurrency = 8, "1,8"
    from peft import PeftModel

    from mptkern.prompts import MultitaskPrompt
    from mptkern.serve import MultiTaskEngine

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    model, tok, label = harness.load_model(args.model_size, device=device, dtype=dtype)
    eos = model.generation_config.eos_token_id
    eos_ids = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])} if eos is not None else {tok.eos_token_id}
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    task_names = [f"task{k}" for k in range(args.K)]
    prompt = MultitaskPrompt(args.K, args.l, model.config.hidden_size, rank=1, task_names=task_names)
    with torch.no_grad():
        prompt.prompt_embeddings.normal_(0, 0.05)  # embedding-sized values: outputs stay text-like
    reqs = make_requests(args, tok, task_names)

    with tempfile.TemporaryDirectory() as adapter:
        prompt.to_peft(adapter)
        # the base model is shared: a prompt-learning adapter adds no layers to it
        peft_model = PeftModel.from_pretrained(model, adapter).to(device, dtype).eval()
        loaded = MultitaskPrompt.from_peft(adapter, device=device).to(dtype)
    max_seq = args.max_len + args.max_new
    engine = MultiTaskEngine(model, tok, loaded, max_batch_tokens=args.max_batch_tokens,
                             max_running=args.max_running, max_seq_len=max_seq)
    hf = hf_generators(model, loaded, peft_model)
    run = {"mptkern-engine": lambda rs, t0=None: engine_run(engine, rs, task_names),
           **{name: (lambda rs, t0=None, g=g: hf_run(g, rs, args, pad_id, eos_ids, t0)) for name, g in hf.items()}}

    # -- agreement before timing: one request at a time, no padding ------------------------------
    picks = [reqs[(i * len(reqs)) // args.check] for i in range(args.check)] if args.check else []
    peft_bad = None
    agreeing = []  # --loose-check: leading tokens on which the engine equals the baseline, per request
    for j, req in enumerate(picks):
        out = {name: fn([req])[0][0] for name, fn in run.items()}
        if args.loose_check:
            e, b = out["mptkern-engine"], out[BASELINE]
            agreeing.append((next((i for i, (x, y) in enumerate(zip(e, b)) if x != y), min(len(e), len(b))), len(b)))
        elif out["mptkern-engine"] != out[BASELINE]:
            print(f"DISAGREEMENT on check request {j} (task {task_names[req[0]]}, {len(req[1])} input tokens):\n"
                  f"  {BASELINE}: {out[BASELINE]}\n  engine:      {out['mptkern-engine']}", file=sys.stderr)
            raise harness.Disagreement("greedy tokens differ; nothing is timed or written")
        if peft_bad is None and out["hf-peft"] != out[BASELINE]:
            peft_bad = (j, out["hf-peft"], out[BASELINE])
    if args.loose_check:
        print("check (loose): leading tokens equal to " + BASELINE + " per request: "
              + ", ".join(f"{a}/{n}" for a, n in agreeing))
        if 2 * sum(a == 0 for a, _ in agreeing) > len(agreeing):
            raise harness.Disagreement("the first generated token differs on most check requests; nothing is timed or written")
    else:
        print(f"check: {len(picks)} requests token-identical (engine vs {BASELINE}, unbatched)")
    contenders = ["mptkern-engine", BASELINE]
    if peft_bad is None:
        contenders.append("hf-peft")
        print(f"check: hf-peft equals {BASELINE} on the same requests")
    else:
        j, bad, good = peft_bad
        print(f"hf-peft left out: its greedy tokens differ from {BASELINE} on check request {j} "
              f"(peft {importlib.metadata.version('peft')}, transformers {importlib.metadata.version('transformers')}):\n"
              f"  hf-peft:     {bad}\n  {BASELINE}: {good}")

    # -- timing: each concurrency level, both contenders side by side ------------------------------
    warm = reqs[: min(len(reqs), 2 * args.K)]
    for name in contenders:
        run[name](warm)
    levels = [int(c) for c in args.concurrency.split(",")] if args.concurrency else [len(reqs)]
    rows = []
    for level in levels:
        level_reqs = reqs[:level]  # tasks interleaved: 16 requests span 8 tasks
        timed = {name: [] for name in contenders}
        peak_blocks = 0
        for rep in range(args.repeats):
            for name in (contenders if rep % 2 == 0 else contenders[::-1]):
                engine.kv.peak_used = engine.kv.num_used  # the peak of this pass (prefixes stay cached)
                t0 = time.perf_counter()
                runs = run[name](level_reqs, t0)
                timed[name].append((time.perf_counter() - t0, runs))
                if name == "mptkern-engine":
                    peak_blocks = max(peak_blocks, engine.kv.peak_used)
        stats, outputs = {}, {}
        for name, passes in timed.items():
            seconds, outputs[name] = sorted(passes, key=lambda x: x[0])[len(passes) // 2]
            stats[name] = summarize(outputs[name], seconds)
        base = stats[BASELINE]
        kv_mib = peak_blocks * engine.metrics()["kv_block_bytes"] / 2**20
        slab_mib = slab_bytes(model, len(level_reqs), max_seq, {k for k, _, _ in level_reqs}, args.l, dtype) / 2**20
        for name, s in stats.items():
            agree = sum(a[0] == b[0] for a, b in zip(outputs[name], outputs["mptkern-engine"]))
            engine_row = name == "mptkern-engine"
            rows.append(dict(op="multitask_generate", contender=name, K=len({k for k, _, _ in level_reqs}),
                             requests=len(level_reqs), l=args.l, min_len=args.min_len, max_len=args.max_len,
                             min_new=args.min_new, max_new=args.max_new, hf_batch=args.hf_batch,
                             max_running=args.max_running, dtype=args.dtype,
                             tokens=s["tokens"], seconds=round(s["seconds"], 3), tokens_per_s=round(s["tokens_per_s"], 1),
                             ttft_ms=round(s["ttft_ms"], 1), tpot_ms=round(s["tpot_ms"], 2),
                             throughput_vs_hf=round(s["tokens_per_s"] / base["tokens_per_s"], 3),
                             tpot_vs_hf=round(s["tpot_ms"] / base["tpot_ms"], 3),
                             identical_requests=agree,
                             kv_peak_mib=round(kv_mib, 2) if engine_row else "",
                             slab_kv_mib=round(slab_mib, 2) if engine_row else ""))
    print(f"multi-task generation, {label}, l={args.l}, inputs {args.min_len}-{args.max_len} tokens, "
          f"{args.min_new}-{args.max_new} new tokens, greedy, {args.dtype} on {harness.device_name(args.device)}")
    print(f"{'contender':<16} {'reqs':>5} {'K':>3} {'tokens':>7} {'s':>8} {'tokens/s':>9} {'thr vs HF':>10} "
          f"{'TTFT ms':>9} {'TPOT ms':>8} {'TPOT vs HF':>11} {'= engine':>9} {'KV MiB':>8} {'slab MiB':>9}")
    for r in rows:
        print(f"{r['contender']:<16} {r['requests']:>5} {r['K']:>3} {r['tokens']:>7} {r['seconds']:>8.2f} "
              f"{r['tokens_per_s']:>9.1f} {r['throughput_vs_hf']:>10.2f} {r['ttft_ms']:>9.1f} {r['tpot_ms']:>8.2f} "
              f"{r['tpot_vs_hf']:>11.2f} {r['identical_requests']:>4}/{r['requests']:<4} {r['kv_peak_mib']!s:>8} "
              f"{r['slab_kv_mib']!s:>9}")
    print("'= engine': requests whose tokens equal the engine's; HF batches are left padded, and padding changes "
          "matmul shapes, which can flip a near-tie greedy pick. KV MiB: the engine's peak K/V blocks in the pass; "
          "slab MiB: what the slab design this engine replaced allocated for the same requests (one max-length slab "
          "per request, each task's prefix K/V held twice).")
    if not args.device.startswith("cuda"):
        print("CPU run: only the ratios measured side by side here count.")
    harness.append_rows(args.out, rows, args.device)
    return 0


def slab_bytes(model, requests, max_seq, tasks, l, dtype) -> int:
    """K/V bytes of the slab design (before paging): ``layers x requests x Hkv x max_seq x D`` for K
    and for V, plus every used task's prefix K/V twice (its capture and the padded pool)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
    return per_token * (requests * max_seq + 2 * len(tasks) * l)


if __name__ == "__main__":
    sys.exit(main())
