#!/usr/bin/env bash
# Idempotent environment set-up for mimiq_mm (called by `make setup`).
#
#  * creates $VENV (default .venv) with $PYTHON (default python3.11)
#  * installs $TORCH_SPEC (default torch==2.14.1 torchvision==0.29.1)
#  * builds mmcv 2.1.0 from its sdist WITH compiled ops, once, and caches the wheel in
#    $MIMIQ_WHEEL_CACHE (default ~/.cache/mimiq_mm/wheels) keyed by mmcv/torch/python/cuda
#  * installs the rest (pinned in setup.py) and this package in editable mode
#  * verifies that mmcv.ops loads
# A second run with nothing changed only re-checks imports (a few seconds).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
MMCV_VERSION=2.1.0
CACHE=${MIMIQ_WHEEL_CACHE:-$HOME/.cache/mimiq_mm/wheels}
MAX_JOBS=${MAX_JOBS:-$(nproc)}
log() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  command -v "$PYTHON" >/dev/null || { echo "[setup] $PYTHON not found; set PYTHON=/path/to/python3.10-3.12" >&2; exit 1; }
  log "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PY=$(cd "$VENV" && pwd)/bin/python

# Everything that decides what gets installed goes into the stamp key.
key=$(cat setup.py tools/setup_env.sh | sha256sum | cut -c1-16)-$(echo "$TORCH_SPEC" | sha256sum | cut -c1-8)
stamp=$VENV/.mimiq-setup-$key
verify() {
  "$PY" - <<'PY'
import sys
try:
    import mmcv
    from mmcv.ops import nms, RoIAlign  # noqa: F401  (needs the compiled _ext)
except Exception as e:  # pragma: no cover - exercised by set-up only
    sys.exit("[setup] mmcv.ops does not load (%s: %s).\n"
             "        mmcv was built without its compiled ops. Fix: rm -rf .venv "
             "$MIMIQ_WHEEL_CACHE/mmcv-* and run `make setup` again (it builds with "
             "--no-build-isolation and MMCV_WITH_OPS=1)." % (type(e).__name__, e))
import torch, mmdet, mmseg, mmengine, timm, mimiq_mm  # noqa: F401
print("[setup] ok: torch %s, mmcv %s (ops), mmengine %s, mmdet %s, mmseg %s, timm %s"
      % (torch.__version__, mmcv.__version__, mmengine.__version__, mmdet.__version__,
         mmseg.__version__, timm.__version__))
PY
}
if [ -f "$stamp" ] && verify; then exit 0; fi

log "installing $TORCH_SPEC and build prerequisites"
# shellcheck disable=SC2086
"$PY" -m pip install -q $TORCH_SPEC
# setuptools: torch 2.14 wants >=77.0.3; mmcv's setup.py and mmengine import pkg_resources,
# which setuptools 81 removes. (Older torch accept any setuptools.)
"$PY" -m pip install -q "setuptools>=64,<81" wheel ninja

tag=$("$PY" -c "import sys, torch; v=torch.__version__.replace('+','_'); \
cu='cuda' if (torch.cuda.is_available() or __import__('os').environ.get('FORCE_CUDA')=='1') else 'cpu'; \
print(f'torch{v}-cp{sys.version_info[0]}{sys.version_info[1]}-{cu}')")
wdir=$CACHE/mmcv-$MMCV_VERSION-$tag
whl=$(ls "$wdir"/mmcv-$MMCV_VERSION-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$whl" ]; then
  log "no cached mmcv wheel in $wdir: building mmcv $MMCV_VERSION with ops (~12 min on 2 cores)"
  build=$(mktemp -d)
  sdist=""
  for cand in ../shared/gpu/sdist/mmcv-$MMCV_VERSION.tar.gz "$CACHE/mmcv-$MMCV_VERSION.tar.gz"; do
    [ -f "$cand" ] && { sdist=$cand; break; }
  done
  if [ -z "$sdist" ]; then
    mkdir -p "$CACHE"
    "$PY" -m pip download -q --no-deps --no-binary :all: -d "$CACHE" "mmcv==$MMCV_VERSION"
    sdist=$CACHE/mmcv-$MMCV_VERSION.tar.gz
  fi
  tar xzf "$sdist" -C "$build"
  src=$build/mmcv-$MMCV_VERSION
  # torch >= 2.12 headers need C++20; mmcv 2.1.0 hard-codes c++14/c++17.
  sed -i 's/c++14/c++20/g; s/c++17/c++20/g' "$src/setup.py"
  (cd "$src" && MMCV_WITH_OPS=1 MAX_JOBS=$MAX_JOBS \
     "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$build/whl" .)
  mkdir -p "$wdir"
  cp "$build"/whl/mmcv-*.whl "$wdir/"
  rm -rf "$build"
  whl=$(ls "$wdir"/mmcv-$MMCV_VERSION-*.whl | head -n1)
  log "cached $whl"
fi
"$PY" -m pip install -q --no-deps --force-reinstall "$whl"
log "installing mimiq_mm and its pinned requirements"
"$PY" -m pip install -q -e ".[tests]"
verify
rm -f "$VENV"/.mimiq-setup-*
touch "$stamp"
