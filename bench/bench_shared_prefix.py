"""A prompt-tuning training step (forward + backward) with shared-prefix packing vs concatenation.

Contenders, all on the same frozen SmolLM2-135M-Instruct and the same batch (B sequences of random
lengths in [min_len, max_len], task ids over K tasks, LM loss on every real token):
  * ``mptkern-shared``: ``PromptedLM(share_prefix=True)`` with a ``MultitaskPrompt``;
  * ``mptkern-concat``: ``PromptedLM(share_prefix=False)``, the same prompt concatenated per sequence;
  * ``peft-mpt``: PEFT's MultitaskPromptTuning model (concatenation), same prompt size.
Each contender runs in a fresh process (so peak memory is its own); throughput counts the real
input tokens per second (prompt rows are overhead, not work). CPU: only ratios count.

    python bench/bench_shared_prefix.py --device cpu
    python bench/bench_shared_prefix.py --model-size 1b   # random-weight Llama-3.2-1B shape, no download
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import harness

CONTENDERS = ("mptkern-shared", "mptkern-concat", "peft-mpt")


def make_batch(args, vocab):
    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.B,), generator=g)
    n = int(lengths.max())
    ids = torch.randint(10, vocab, (args.B, n), generator=g)
    mask = (torch.arange(n)[None] < lengths[:, None]).long()
    task_ids = torch.randint(0, args.K, (args.B,), generator=g)
    return ids, mask, ids.masked_fill(mask == 0, -100), task_ids


def measure(args) -> dict:
    """Runs in the child process: build one contender, time its step, measure its peak memory."""
    from mptkern.models import PromptedLM
    from mptkern.prompts import MultitaskPrompt

    device = torch.device(args.device)
    model, _, _ = harness.load_model(args.model_size, device=device, dtype=getattr(torch, args.dtype))
    d = model.config.hidden_size
    ids, mask, labels, task_ids = (t.to(device) for t in make_batch(args, model.config.vocab_size))
    if args.only == "peft-mpt":
        from peft import MultitaskPromptTuningConfig, get_peft_model

        cfg = MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.l, num_tasks=args.K, num_ranks=1,
                                          prompt_tuning_init="RANDOM", token_dim=d)
        peft_model = get_peft_model(model, cfg)

        def step():
            out = peft_model(input_ids=ids, attention_mask=mask, labels=labels, task_ids=task_ids)
            out.loss.backward()
            return out.loss
        params = [p for p in peft_model.parameters() if p.requires_grad]
    else:
        prompt = MultitaskPrompt(args.K, args.l, d).to(device, getattr(torch, args.dtype))
        lm = PromptedLM(model, prompt, share_prefix=args.only == "mptkern-shared")

        def step():
            out = lm(ids, mask, task_ids, labels, return_logits=False)
            out.loss.backward()
            return out.loss
        params = list(prompt.parameters())
    box = []
    peak = harness.peak_memory(lambda: box.append(float(step())), device)  # first step: nothing cached yet
    ms = harness.time_fn(step, device=device, warmup=0, rep=args.rep_ms)
    loss = box[0]
    return dict(ms=ms, peak_mb=None if peak is None else peak / 2**20, loss=loss,
                trainable=sum(p.numel() for p in params), tokens=int(mask.sum()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--B", type=int, default=32)
    p.add_argument("--K", type=int, default=8)
    p.add_argument("--l", type=int, default=100)
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rep-ms", type=float, default=None, help="timing budget per contender (default: 3 steps' worth)")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--model-size", choices=sorted(harness.MODEL_SIZES), default=None,
                   help="a random-weight Llama of this size (harness.MODEL_SIZES) instead of the embedded SmolLM2-135M")
    p.add_argument("--out", default=str(harness.ROOT / "bench" / "results" / "shared_prefix.csv"))
    p.add_argument("--only", choices=CONTENDERS, help=argparse.SUPPRESS)  # child-process mode
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.rep_ms is None:
        args.rep_ms = 100.0 if args.device.startswith("cuda") else 1.0  # CPU: time_fn's minimum of 5 steps
    if args.only:
        print(json.dumps(measure(args)))
        return 0

    results = harness.run_isolated(__file__, argv if argv is not None else sys.argv[1:], args.contenders.split(","))
    losses = {r["loss"] for r in results.values()}
    base = results.get("peft-mpt") or next(iter(results.values()))
    rows = []
    for name, r in results.items():
        rows.append(dict(op="prompt_tuning_step", contender=name, mode="fwd+bwd", B=args.B, K=args.K, l=args.l,
                         min_len=args.min_len, max_len=args.max_len, dtype=args.dtype, ms=round(r["ms"], 2),
                         tokens_per_s=round(r["tokens"] / r["ms"] * 1e3, 1), peak_mb=None if r["peak_mb"] is None else round(r["peak_mb"], 1),
                         speedup_vs_peft=round(base["ms"] / r["ms"], 3), loss=round(r["loss"], 4), trainable=r["trainable"]))
    harness.append_rows(args.out, rows, args.device)
    label = "SmolLM2-135M" if args.model_size is None else f"random Llama-{args.model_size}"
    print(f"prompt-tuning step, {label}, B={args.B} K={args.K} l={args.l} lengths {args.min_len}-{args.max_len}, "
          f"{args.dtype} on {harness.device_name(args.device)}")
    print(f"{'contender':<16} {'ms':>10} {'tokens/s':>10} {'peak MB':>9} {'vs peft':>8} {'loss':>8}")
    for r in rows:
        print(f"{r['contender']:<16} {r['ms']:>10.1f} {r['tokens_per_s']:>10.1f} {r['peak_mb'] or float('nan'):>9.1f} "
              f"{r['speedup_vs_peft']:>8.2f} {r['loss']:>8.4f}")
    if len(losses) > 1:
        print("note: losses differ across contenders because each initialises its prompt randomly; the "
              "equality of the computed function is proven in tests/test_prompted_lm.py")
    if not args.device.startswith("cuda"):
        print("CPU run: only the ratios measured side by side here count.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
