#!/usr/bin/env bash
# The main job: install what is needed (scripts/install.sh), then run the demo sweep on the two shipped testbed
# VLMs and write its leaderboard + plots to runs/demo/leaderboard/. Extra arguments go to `vtprune sweep`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test,eval
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/vtprune sweep configs/demo.yaml "$@"
