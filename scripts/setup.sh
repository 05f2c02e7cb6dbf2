#!/usr/bin/env bash
# Create .venv with the right torch build and this project installed. Idempotent and quick when done.
#   bash scripts/setup.sh          runtime only
#   bash scripts/setup.sh --dev    + test/lint tools
# PTFT_TORCH_SPEC overrides the torch requirement (e.g. "torch==2.5.1+cu124" with your own index).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
VENV=${PTFT_VENV:-.venv}
extras=""
[[ "${1:-}" == "--dev" ]] && extras="[dev,mpi]"

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup: creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

# torch first: a plain "torch" requirement on a machine without it pulls a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [[ -n "${PTFT_TORCH_SPEC:-}" ]]; then
    "${pip[@]}" "$PTFT_TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    echo "setup: GPU found, installing torch (CUDA build)"
    "${pip[@]}" torch
  else
    echo "setup: no GPU, installing the CPU build of torch"
    "${pip[@]}" --retries 0 --timeout 10 torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
      || "${pip[@]}" "torch==2.13.0"
  fi
fi

stamp="$VENV/.ptft-installed$extras"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
  echo "setup: installing ptft-dist$extras (log: $VENV/install.log)"
  if ! "${pip[@]}" -e ".$extras" > "$VENV/install.log" 2>&1; then
    grep -v "^WARNING: Location" "$VENV/install.log" | tail -30 >&2
    echo "setup: installation failed" >&2; exit 1
  fi
  "$VENV/bin/python" -c "import ptft_dist, deepspeed, datatrove, transformers" 2>/dev/null \
    || { echo "setup: installed, but the imports fail (see $VENV/install.log)" >&2; exit 1; }
  touch "$stamp"
fi
