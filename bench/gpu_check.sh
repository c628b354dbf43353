#!/usr/bin/env bash
# The GPU proof in one command (issue #16): mptkern env, the CUDA tests against the float64 oracles
# (bf16 and fp16, the csrc/ extension built with the machine's nvcc), every benchmark at the
# paper's shapes against its anchors, CSVs and a plot in the output folder. At most 8 minutes on
# one H200; every stage has its own time cap, and a failing stage does not stop the later ones
# (the exit status is 1 if any failed). bench/gpu_check.py holds the stages and their caps.
#
#   bash bench/gpu_check.sh              # CUDA machine; results in $OUT, else bench/results/gpu/
#   bash bench/gpu_check.sh --dry-run    # any machine: CPU, tiny shapes, TRITON_INTERPRET=1
#   bash bench/gpu_check.sh --only tests,prompt_embed
#
# Needs no install of mptkern: the repository root goes on PYTHONPATH. The interpreter is $PYTHON,
# else .venv/bin/python when present, else python3 (a GPU image's own, with torch, triton,
# transformers, peft and pytest). Set MPTKERN_COMMIT=<hash> where the tree has no .git, so the
# rows name the commit they measured.
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$py" bench/gpu_check.py "$@"
