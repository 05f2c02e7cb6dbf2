#!/usr/bin/env bash
# README command one: install what is needed, then run the whole workflow on the demo data:
# demo data → prepare → pretrain (2 ranks, ZeRO-2) → convert → fine-tune (full, LoRA, random-init
# baseline) → test-set evaluation → summary table.     bash scripts/demo.sh [DEMO_DIR] [--quick]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/ptft/torch_extensions}
.venv/bin/python scripts/build_ds_ops.py 2>&1 | grep -v "^\[20" | tail -1
DEMO=demo
[[ $# -gt 0 && "$1" != --* ]] && { DEMO=$1; shift; }
exec .venv/bin/python -m ptft_dist.cli demo --output "$DEMO" "$@"
