"""Driver for the paper's setting: Llama 3.1 8B, Meditron3 8B or gpt-oss 20B from local weights, on
real clinical datasets named in mptkern/data/registry.yaml and held under --data-root.

    python python/paper_setting.py --model /models/Llama-3.1-8B --data-root /data/clinical \\
        --output-dir runs/llama31 [--dry-run]

Nothing is downloaded: the model folder must hold a Hugging Face checkpoint and the data root the
files the registry names (``--dry-run`` lists what is missing). Prompt length 100 and rank 1 follow
the paper; stage sizes are starting points to tune.
"""

import argparse

from mptkern.train import DataConfig, DistillConfig, MPTTrainer, StageConfig, TargetConfig, TrainConfig


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local folder of a Hugging Face causal LM (llama or gpt_oss)")
    p.add_argument("--data-root", required=True)
    p.add_argument("--registry", default=None, help="task registry YAML (default: the one shipped with mptkern)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--dry-run", action="store_true", help="only check that every data file is present")
    args = p.parse_args()
    from mptkern.data import missing_files, read_registry

    entries = read_registry(args.registry)
    missing = missing_files(entries, args.data_root)
    if missing:
        raise SystemExit("missing data files:\n  " + "\n  ".join(missing))
    if args.dry_run:
        print(f"all {len(entries)} registry entries found under {args.data_root}")
        return
    from mptkern.data import registry_path

    config = TrainConfig(
        model=args.model, prompt_len=100, rank=1, output_dir=args.output_dir, max_new_tokens=128,
        data=DataConfig(registry=args.registry or str(registry_path()), data_root=args.data_root),
        teachers=StageConfig(steps=2000, batch_size=32, lr=0.3, warmup_steps=100),
        distill=StageConfig(steps=4000, batch_size=32, lr=0.3, warmup_steps=200),
        distill_loss=DistillConfig(temperature=2.0, ce_weight=1.0, kl_weight=0.9, hidden_weight=0.9),
        target=StageConfig(steps=200, batch_size=8, lr=0.3, warmup_steps=10),
        target_init=TargetConfig(shots=[0, 1, 5, 10, 20], seeds=[0, 1, 2, 3, 4]),
    )
    trainer = MPTTrainer(config)
    print(MPTTrainer.format_results(trainer.run()))


if __name__ == "__main__":
    main()
