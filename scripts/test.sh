#!/usr/bin/env bash
# The test command: install what is needed (scripts/install.sh), then run the whole suite: one torch thread per
# process, VTPRUNE_TEST_WORKERS pytest-xdist workers (default 2, one per core of the 2-core CI machine; 0 = no
# workers, in this process). Test files are the unit of distribution, so module fixtures are built once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test,eval
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
workers="${VTPRUNE_TEST_WORKERS:-2}"
if [ "$workers" = 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
exec .venv/bin/python -m pytest -q -n "$workers" --dist loadfile "$@"
