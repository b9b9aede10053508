#!/usr/bin/env bash
# Create (or reuse) a virtual environment for this clone and install torch-adamp into it, with the
# torch-adamp command (the package in reproduce/: toy, compare, reproduce, bench), both editable.
#
#   bash scripts/setup.sh                 # .venv with the library and the torch-adamp command (torch-adamp compare)
#   bash scripts/setup.sh test,docs       # the library's extras, comma-separated (see pyproject.toml)
#   TORCH_ADAMP_REPRODUCE=0 bash scripts/setup.sh   # the library alone, without reproduce/ (and its matplotlib, tqdm, pycocotools)
#
# Needs only Python >= 3.10 with its venv module (Debian/Ubuntu: apt-get install python3-venv).
# The venv is ./.venv unless $TORCH_ADAMP_VENV names another folder; an existing one is reused.
# torch is pinned (TORCH_VERSION below) and taken as the CPU build, the standard way:
#   * a plain `pip install torch==X` when the indexes pip sees offer a CPU build (a +cpu wheel on
#     disk or on a mirror, or PyPI on macOS/Windows): no other host is contacted;
#   * otherwise (PyPI on Linux offers only the ~3 GB CUDA build) from PyTorch's CPU index,
#     `pip install torch==X --index-url https://download.pytorch.org/whl/cpu`;
#   * $TORCH_INDEX_URL, when set, is used as that index instead (e.g. .../whl/cu128 for a GPU build).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
CPU_INDEX=https://download.pytorch.org/whl/cpu
extras=${1:-}
venv=${TORCH_ADAMP_VENV:-.venv}
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { echo "setup: $*" >&2; }

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
  say "reusing the virtual environment $venv"
else
  py=${PYTHON:-}
  if [ -z "$py" ]; then
    for candidate in python3 python; do
      if command -v "$candidate" >/dev/null 2>&1; then py=$candidate; break; fi
    done
  fi
  if [ -z "$py" ]; then
    say "error: no python3 or python on PATH (install Python >= 3.10, or set PYTHON=/path/to/python)"
    exit 1
  fi
  if ! "$py" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
    say "error: $py is Python $("$py" -c 'import platform; print(platform.python_version())'); torch-adamp needs >= 3.10"
    exit 1
  fi
  say "creating the virtual environment $venv with $("$py" -c 'import sys; print(sys.executable)')"
  if ! "$py" -m venv "$venv"; then
    rm -rf "$venv"
    say "error: '$py -m venv' failed (Debian/Ubuntu: apt-get install python3-venv)"
    exit 1
  fi
fi
pip=("$venv/bin/python" -m pip)

# Does a plain pin find a CPU build? On Linux, PyPI's torch is the CUDA build; a CPU build there carries
# the local version label +cpu (a wheel on disk, a mirror). Elsewhere PyPI's torch is the CPU build.
# `pip index versions` reads only the indexes' listings (it downloads no wheel).
cpu_build_visible() {
  [ "$(uname -s)" != Linux ] && return 0
  local listing
  listing=$("${pip[@]}" index versions torch 2>/dev/null) || return 0  # no listing: keep the plain pin
  [[ "$listing" == *"$TORCH_VERSION+cpu"* ]]
}
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  say "torch $TORCH_VERSION from $TORCH_INDEX_URL"
  "${pip[@]}" install -q "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
elif "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  say "torch $TORCH_VERSION already installed"
elif cpu_build_visible; then
  say "torch $TORCH_VERSION"
  "${pip[@]}" install -q "torch==$TORCH_VERSION"
else
  say "torch $TORCH_VERSION: pip's indexes here offer only the CUDA build; taking the CPU build from $CPU_INDEX"
  "${pip[@]}" install -q "torch==$TORCH_VERSION" --index-url "$CPU_INDEX"
fi

if [ -n "$extras" ]; then
  say "torch-adamp (editable) with the extras [$extras]"
  "${pip[@]}" install -q -e ".[$extras]"
else
  say "torch-adamp (editable)"
  "${pip[@]}" install -q -e .
fi
# the torch-adamp command (reproduce/, not on PyPI): its torch-adamp requirement is the editable library above
if [ "${TORCH_ADAMP_REPRODUCE:-1}" != 0 ]; then
  say "torch-adamp-reproduce (editable, reproduce/): the torch-adamp command"
  "${pip[@]}" install -q -e ./reproduce
fi
case ",$extras," in
  *,test,*)
    # the timm integration's tests load timm's optimizer registry from the installed files; --no-deps
    # because timm's torchvision dependency would replace the CPU torch by the CUDA build
    "${pip[@]}" install -q --no-deps timm
    # the DeepSpeed tests: DS_BUILD_OPS=0 builds no ops at install time (torch's CPU build is kept; at first use
    # DeepSpeed JIT-builds its small shared-memory op with ninja, installed with it, and g++)
    DS_BUILD_OPS=0 "${pip[@]}" install -q -e ".[deepspeed]"
    ;;
esac
"$venv/bin/python" - "$TORCH_VERSION" <<'PY'
import sys

import torch

import torch_adamp

assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
print(f"setup: ready: torch {torch.__version__}, torch-adamp {torch_adamp.__version__} in {sys.prefix}", file=sys.stderr)
PY
