#!/usr/bin/env bash
# The GPU report of issue 20 in one command: on a machine with one CUDA GPU, this repository and a package registry
# (no model hub: real-size random-weight models from configs/models/*.json), install what is needed, then run
# bench/gpu_report.py inside a global time budget (default 8 minutes, installation included) and write
# bench/results/gpu-<UTC date>/report.json and report.md.
#
#   bash bench/gpu.sh                 # the GPU run
#   bash bench/gpu.sh --dry-run       # tiny models on the CPU: the same code path and report format, ~1-2 min
#   VTPRUNE_GPU_BUDGET_S=600 bash bench/gpu.sh --models llava-next-7b   # extra options go to gpu_report.py
#
# Environment: VTPRUNE_GPU_BUDGET_S (total seconds, default 480), VTPRUNE_GPU_FLASH=0 (do not try to install
# FlashAttention-2), VTPRUNE_GPU_OUT (report folder), VTPRUNE_PYTHON (an interpreter that already has torch with CUDA
# and transformers, e.g. a GPU image with no registry: nothing is installed, the repository is put on PYTHONPATH
# and the report records the versions it ran with).
set -euo pipefail
start=$(date +%s)
cd "$(dirname "$0")/.."
budget="${VTPRUNE_GPU_BUDGET_S:-480}"
dry=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry=1; done
out="${VTPRUNE_GPU_OUT:-bench/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)$([ $dry = 1 ] && echo -dry)}"

# 1. torch 2.14.1 (on x86_64 PyPI's wheel is the CUDA 13.0 build, +cu130: it needs an NVIDIA driver >= 580),
#    transformers and the rest, pinned by constraints.txt; the test extra only (no lmms-eval): scripts/install.sh
#    (skipped when .venv already has the pinned torch and transformers with vtprune importable)
py="${VTPRUNE_PYTHON:-.venv/bin/python}"
if [ -n "${VTPRUNE_PYTHON:-}" ]; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  "$py" -c "import torch, transformers, vtprune; print(f'[gpu.sh] {torch.__version__=} {transformers.__version__=}')" >&2
elif ! "$py" -c "import torch, transformers, vtprune, sys; sys.exit(0 if torch.__version__.startswith('2.14.1') \
and transformers.__version__ == '5.23.0' else 1)" 2>/dev/null; then
  bash scripts/install.sh "${VTPRUNE_GPU_EXTRAS:-test}"
fi

# 2. FlashAttention-2 when a prebuilt wheel installs; PyPI ships flash-attn as a source package whose build needs
#    nvcc and far more than this budget, so only binaries are tried, for at most 60 s, without touching torch
if [ "$dry" = 0 ] && [ "${VTPRUNE_GPU_FLASH:-1}" != 0 ] && ! "$py" -c "import flash_attn" 2>/dev/null; then
  echo "[gpu.sh] trying a prebuilt flash-attn wheel (binary only, no dependencies)" >&2
  timeout 60 "$py" -m pip --disable-pip-version-check -q install --only-binary=:all: --no-deps flash-attn \
    >/dev/null 2>&1 || echo "[gpu.sh] no prebuilt flash-attn wheel: FlashAttention-2 is skipped (noted in the report)" >&2
fi

# 3. the GPU must be visible to torch
if [ "$dry" = 0 ] && ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "[gpu.sh] torch $("$py" -c 'import torch; print(torch.__version__)') sees no CUDA device." >&2
  nvidia-smi >&2 || echo "[gpu.sh] nvidia-smi not found: no NVIDIA driver" >&2
  exit 2
fi

# 4. the report, inside what is left of the budget (15 s kept for writing and exiting)
left=$(( budget - ($(date +%s) - start) - 15 ))
if [ "$left" -lt 60 ] && [ "$dry" = 0 ]; then
  echo "[gpu.sh] only ${left} s left of ${budget} s after installing: rerun (the install is cached now)" >&2
  exit 3
fi
echo "[gpu.sh] installed in $(( $(date +%s) - start )) s; running the report with a ${left} s budget -> $out" >&2
# a hard stop 10 s past the budget: the report is rewritten after every block, so a stopped run still leaves one
# (its "complete" is false); the budget guard inside should never let it come to that
rc=0
HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false timeout -k 5 $(( left + 10 )) \
  "$py" bench/gpu_report.py --budget-s "$left" --out "$out" "$@" || rc=$?
[ "$rc" = 124 ] && echo "[gpu.sh] stopped at the hard limit: $out holds the blocks finished before it" >&2
echo "[gpu.sh] done in $(( $(date +%s) - start )) s (exit $rc): $out/report.md" >&2
exit "$rc"
