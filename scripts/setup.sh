#!/usr/bin/env bash
# Create (or reuse) a virtual environment for this clone and install torch-adamp into it, with the
# torch-adamp command (the package in reproduce/: toy, compare, reproduce, bench), both editable.
#
#   bash scripts/setup.sh                 # .venv with the library and the torch-adamp command (torch-adamp compare)
#   bash scripts/setup.sh test,docs       # the library's extras, comma-separated (see pyproject.toml)
#   TORCH_ADAMP_REPRODUCE=0 bash scripts/setup.sh   # the library alone, without reproduce/ (and its matplotlib, tqdm, pycocotools)
#   bash scripts/setup.sh timm            # + timm, with the torchvision built for the installed torch (see below);
#                                         # exit status 3 where none can be had (the rest installed, nothing broken)
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

# `timm` is not an extra of the package (a requirement cannot say "the torchvision built for this torch"):
# it is handled at the end, and taken out of the list given to pip
want_timm=0
case ",$extras," in *,timm,*) want_timm=1 ;; esac
extras=$(echo ",$extras," | sed -e 's/,timm,/,/g' -e 's/^,*//' -e 's/,*$//')
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
    # the follow-ups' equality tests (tests/test_corrected_decay.py, test_orthograd.py) against pytorch_optimizer's
    # AdamC and OrthoGrad (pinned: the tests match its conventions): --no-deps (it declares torch; numpy is ours)
    "${pip[@]}" install -q --no-deps "pytorch_optimizer==4.1.0"
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

# timm imports torchvision, which must be the build made for the installed torch: the matching version
# (torch 2.X -> torchvision 0.(X+15)) *and* the same variant (CPU, a CUDA version, or PyPI's default). A plain
# `pip install timm` does not ensure that: it takes PyPI's newest torchvision, which pins its own torch, and
# replaces the installed torch (a CPU build by the ~3 GB CUDA one). Here torchvision is chosen from the
# indexes' listings (+cpu / +cuXYZ / no label, as torch's version says), installed with torch pinned, and
# kept only if it imports; then timm, with both pinned. Where no such torchvision can be had (the CPU builds
# are only on download.pytorch.org and its mirrors), it stops with the reason and leaves torch and every
# other package as they were.
if [ "$want_timm" = 1 ]; then
  tv_check='import torch, torchvision; torchvision.ops.nms(torch.zeros(1, 4), torch.ones(1), 0.5)'
  if "$venv/bin/python" -c "$tv_check; import timm" >/dev/null 2>&1; then
    say "timm: already installed, with a torchvision that imports"
    exit 0
  fi
  # the distribution's version says where torch came from: 2.13.0+cpu / +cu128 from PyTorch's index, 2.13.0 from
  # PyPI (whose wheels still report torch.__version__ "2.13.0+cu130" at run time)
  torch_pin=$("$venv/bin/python" -c 'from importlib.metadata import version; print(version("torch"))')
  tv_before=$("$venv/bin/python" -c 'from importlib.metadata import version; print(version("torchvision"))' 2>/dev/null ||
    true)
  if plan=$("$venv/bin/python" - "${TORCH_INDEX_URL:-}" 2>&1 <<'PY'
import re
import subprocess
import sys
from importlib.metadata import version

index_env = sys.argv[1]
torch_version = version("torch")
base, _, label = torch_version.partition("+")  # "2.13.0", "cpu" / "cu128" / "" (PyPI's build)
major, minor = (int(x) for x in base.split(".")[:2])
if major != 2:
    sys.exit(f"torch {torch_version}: this script knows the torchvision of torch 2.x only")
series = f"0.{minor + 15}."


def listing(index: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "index", "versions", "torchvision", *(["--index-url", index] if index else [])]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = re.search(r"Available versions: (.*)", out)
    return found.group(1).split(", ") if found else []


def key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.partition("+")[0]))


# where each variant lives: the +cpu/+cuXYZ builds on PyTorch's index (or a mirror/disk pip already sees),
# PyPI's default build on PyPI
sources: list[str | None] = [index_env] if index_env else [None]
if not index_env and label:
    sources.append(f"https://download.pytorch.org/whl/{label}")
for source in sources:
    fit = [v for v in listing(source) if v.startswith(series) and v.partition("+")[2] == label]
    if fit:
        print(max(fit, key=key))
        print(source or "")
        sys.exit(0)
where = " or ".join(s or "the indexes pip is configured with" for s in sources)
sys.exit(f"no torchvision {series}x{'+' + label if label else ''} (the build for torch {torch_version}) is listed on {where}")
PY
  ); then
    tv_version=$(echo "$plan" | sed -n 1p)
    tv_index=$(echo "$plan" | sed -n 2p)
    say "timm: torchvision $tv_version${tv_index:+ from $tv_index}, the build for torch $torch_pin"
    if "${pip[@]}" install -q "torchvision==$tv_version" -c <(echo "torch==$torch_pin") ${tv_index:+--index-url "$tv_index"} &&
      "$venv/bin/python" -c "$tv_check" >/dev/null 2>&1; then
      "${pip[@]}" install -q timm -c <(printf 'torch==%s\ntorchvision==%s\n' "$torch_pin" "$tv_version")
      "$venv/bin/python" -c "$tv_check; import timm; print(f'setup: ready: timm {timm.__version__}, torchvision {torchvision.__version__}')" >&2
      exit 0
    fi
    # installed but not importable (or not installed): remove what this step added, so that nothing imports a
    # broken torchvision (one that was there before is left to the user, below)
    if [ -z "$tv_before" ]; then
      "${pip[@]}" uninstall -q -y torchvision >/dev/null 2>&1 || true
    fi
    reason="torchvision $tv_version did not install or import beside torch $torch_pin"
  else
    reason=$plan
  fi
  say "error: timm not installed: $reason."
  say "  timm needs a torchvision built for this torch; torch $torch_pin and every other package are as they were."
  hint=$("$venv/bin/python" -c 'from torch_adamp.integrations.timm import install_hint; print(install_hint())')
  say "  What to install: $hint"
  if [ -n "$tv_before" ] && ! "$venv/bin/python" -c "$tv_check" >/dev/null 2>&1; then
    say "  Note: the torchvision $tv_before installed here does not import beside this torch, which also breaks"
    say "  packages that import it (transformers): 'pip uninstall torchvision' removes it."
  fi
  exit 3  # everything else is installed and ready (CI goes on without timm on status 3)
fi
