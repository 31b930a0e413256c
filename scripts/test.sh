#!/usr/bin/env bash
# The test command: install what is needed (scripts/install.sh), then run the whole suite on one thread.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test,eval
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
