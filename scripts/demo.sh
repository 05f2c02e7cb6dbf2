#!/usr/bin/env bash
# README command one: install what is needed, then run the workflow end to end on the demo data.
#   bash scripts/demo.sh [DEMO_DIR]        (default: ./demo)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
DEMO=${1:-demo}
PY=.venv/bin/python
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
WORKERS=$(nproc 2>/dev/null || echo 2)

declare -a SUMMARY
stage() {  # stage NAME CMD...: run, time, remember
  local name=$1; shift
  echo; echo "=== $name: $*"
  local t0=$SECONDS
  "$@"
  SUMMARY+=("$(printf '%-12s %5ss' "$name" $((SECONDS - t0)))")
}

stage demo-data  $PY -m ptft_dist.cli demo-data --output "$DEMO/data"
stage prepare    $PY -m ptft_dist.cli prepare --input "$DEMO/data/news/news_articles.jsonl" --output "$DEMO/corpus" \
                   --overwrite prepare.workers="$WORKERS" prepare.tokenizer.vocab_size=8000 prepare.shard_size_mb=1
stage verify     $PY -m ptft_dist.cli verify "$DEMO/corpus" --quiet
stage inspect    $PY -m ptft_dist.cli inspect "$DEMO/corpus" --docs 1

echo; echo "=== summary"
printf '%s\n' "${SUMMARY[@]}"
echo "corpus: $DEMO/corpus (report: $DEMO/corpus/prepare_report.json)"
