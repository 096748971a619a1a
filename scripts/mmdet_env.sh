#!/usr/bin/env bash
# Create (or reuse) the mmdetection environment: torch 2.1.2, mmcv 2.1.0 with its compiled ops,
# mmengine 0.10.7, mmdet 3.3.0 and dynconv, from PyPI alone.
#
#   bash scripts/mmdet_env.sh            # or: make mmdet-env
#
# The environment lives in a machine-level cache keyed by the Python version and the hash of its two
# requirements files (requirements/mmdet-torch.txt, requirements/mmdet.txt), and
# `.venv-mmdet` in the checkout is a symlink to it, so every clone on one machine shares one build:
#   ${DYNCONV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dynconv}/venv-mmdet-<hash>
# A stamp file is written only after `import mmcv.ops, mmdet.models, dynconv.integrations.mmdet`
# succeeds; an environment without its stamp (a failed or interrupted build) is deleted and rebuilt.
#
# mmcv: OpenMMLab's prebuilt wheel is tried first (its index is not reachable from everywhere; the
# attempt gives up after a few seconds); otherwise pip builds the PyPI source distribution against the
# installed torch: the CPU ops, or CPU and CUDA ops when an nvcc of torch's CUDA major version (12) is
# on PATH. About 10-15 minutes on 2 cores for the CPU ops; the torch download is about 2.5 GB.
#
# Environment variables: PYTHON (default python3; 3.10 or 3.11), DYNCONV_CACHE, MAX_JOBS (compile jobs,
# default: the number of cores), MMDET_ENV_SKIP_WHEEL_INDEX=1 (build mmcv from source without trying
# OpenMMLab's index).
set -euo pipefail

# Everything below is in main(), which bash parses whole before running: editing this file while a build
# runs (it takes a while) cannot change what the running build executes.
main() {
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
REQ_TORCH=requirements/mmdet-torch.txt
REQ=requirements/mmdet.txt
MMCV_VERSION=2.1.0
LINK=.venv-mmdet

log() { printf '[mmdet-env %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

py_version="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
case "$py_version" in
  3.10|3.11) ;;
  *) log "Python $py_version: mmcv 2.1.0 / torch 2.1.2 need Python 3.10 or 3.11 (set PYTHON=python3.11)"; exit 1 ;;
esac

# the requirement lines only (comments stripped), so editing the files' explanations keeps the cache
key="$(cat "$REQ_TORCH" "$REQ" | sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' | sha256sum | cut -c1-12)"
CACHE="${DYNCONV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dynconv}"
ENV="$CACHE/venv-mmdet-py$py_version-$key"
STAMP="$ENV/.installed"
VPY="$ENV/bin/python"
mkdir -p "$CACHE"

# One build at a time per environment (two clones running CI at once share it).
exec 9>"$ENV.lock"
flock 9

if [ -e "$LINK" ] && [ ! -L "$LINK" ]; then
  log "$ROOT/$LINK exists and is not a link to the cached environment (an environment made by hand?):"
  log "move or remove it, then run this again"
  exit 1
fi

link_and_install_dynconv() {
  ln -sfn "$ENV" "$LINK"
  # dynconv itself, editable and without dependencies: its pyproject names the development torch
  # range, and resolving it would replace torch 2.1.2 and break mmcv's compiled ops. Re-run on every
  # call (seconds) so the shared environment points at the checkout that asked for it.
  "$VPY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" >&2
}

check_imports() {
  # From inside the environment's directory, so dynconv comes from its install, not the working directory.
  (cd "$ENV" && "$VPY" -c 'import mmcv.ops, mmdet.models, dynconv.integrations.mmdet, torch, mmcv, mmdet, dynconv
print(f"  torch {torch.__version__}, mmcv {mmcv.__version__} with ops, mmdet {mmdet.__version__}, dynconv from {dynconv.__file__}")' >&2)
}

if [ -f "$STAMP" ]; then
  link_and_install_dynconv
  check_imports
  log "reusing $ENV"
  exit 0
fi

start=$(date +%s)
if [ -e "$ENV" ]; then
  log "removing an unfinished environment: $ENV"
  rm -rf "$ENV"
fi
log "creating $ENV"
"$PYTHON" -m venv "$ENV"
PIP=("$VPY" -m pip --disable-pip-version-check)

log "stage 1: torch and mmcv's build requirements ($REQ_TORCH)"
"${PIP[@]}" install -r "$REQ_TORCH"

torch_cuda="$("$VPY" -c 'import torch; print(torch.version.cuda or "")')"
torch_mm="$("$VPY" -c 'import torch; print(".".join(torch.__version__.split("+")[0].split(".")[:2]))')"

# mmcv's own dependencies (mmengine, numpy, opencv-python) unpinned would pull NumPy 2 and opencv-python 5
# into torch 2.1's environment: install mmcv with their pins from requirements/mmdet.txt.
MMCV_PINS=()
while read -r spec; do MMCV_PINS+=("$spec"); done < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$REQ" "$REQ_TORCH" \
  | grep -E '^(mmengine|numpy|opencv-python)[<>=!~]')

mmcv_from_index() {
  [ "${MMDET_ENV_SKIP_WHEEL_INDEX:-0}" = 1 ] && return 1
  local variant="cpu"
  [ -n "$torch_cuda" ] && variant="cu${torch_cuda//./}"
  local url="https://download.openmmlab.com/mmcv/dist/$variant/torch$torch_mm.0/index.html"
  log "mmcv: trying OpenMMLab's prebuilt wheel ($url)"
  # the wheel alone from OpenMMLab's index (--no-deps: its dependencies come from PyPI, next)
  "${PIP[@]}" install --timeout 15 --retries 1 --no-index --no-deps --only-binary=:all: \
    --find-links "$url" "mmcv==$MMCV_VERSION" || return 1
  "${PIP[@]}" install "mmcv==$MMCV_VERSION" "${MMCV_PINS[@]}"
}

mmcv_from_source() {
  local cuda=0 nvcc_major=""
  if command -v nvcc >/dev/null 2>&1; then
    nvcc_major="$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')"
  fi
  if [ -n "$torch_cuda" ] && [ -n "$nvcc_major" ] && [ "$nvcc_major" = "${torch_cuda%%.*}" ]; then
    cuda=1
    log "mmcv: building from source with CPU and CUDA ops (nvcc $nvcc_major, torch CUDA $torch_cuda)"
  else
    log "mmcv: building from source with CPU ops (torch CUDA '${torch_cuda:-none}', nvcc '${nvcc_major:-none}': no matching CUDA toolkit)"
  fi
  # --no-build-isolation: mmcv's setup.py imports torch (and pkg_resources, which setuptools >= 81
  # lacks); in pip's isolated build environment neither is there. CUDA_VISIBLE_DEVICES='' keeps a
  # visible GPU from switching on the CUDA build (setup.py also checks torch.cuda.is_available()).
  local hide=()
  [ "$cuda" = 0 ] && hide=(CUDA_VISIBLE_DEVICES=)
  env "${hide[@]}" MMCV_WITH_OPS=1 FORCE_CUDA="$cuda" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "${PIP[@]}" install --no-build-isolation "mmcv==$MMCV_VERSION" "${MMCV_PINS[@]}"
}

if ! mmcv_from_index; then
  mmcv_from_source
fi

log "stage 2: mmengine, mmdet and dynconv's runtime dependencies ($REQ)"
"${PIP[@]}" install -r "$REQ"
link_and_install_dynconv

log "checking: import mmcv.ops, mmdet.models, dynconv.integrations.mmdet"
check_imports
touch "$STAMP"
log "done in $(( $(date +%s) - start )) s: $LINK -> $ENV"
}

main "$@"
