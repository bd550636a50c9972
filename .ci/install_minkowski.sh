#!/usr/bin/env bash
# Install MinkowskiEngine 0.5.4 (CPU-only), the optional `minkowski` sparse backend, into the
# ACTIVE Python environment (activate the venv first; it must already hold the project and torch).
# Works from a brand-new `python3 -m venv`. The source build takes ~6.5 minutes on an idle 2-core
# machine (about 14 CPU-minutes) and 8.5-33 minutes on a shared one (33 min measured at load 6-11),
# so the wheel is cached outside the repository, keyed by torch version, C++ ABI, Python tag and
# platform, and later runs only `pip install` it (~15 s):
#   ${FCMAE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fcmae/wheels}/minkowskiengine-0.5.4/torch-<ver>-cxx11abi<0|1>-cp<XY>-<platform>/
# Exits non-zero when it cannot install a working MinkowskiEngine (.ci/run then fails).
#
# Build notes (why the commands look the way they do):
# - --no-build-isolation: setup.py imports torch, which must be the environment's own torch.
# - --config-settings="--global-option=--cpu_only --blas=openblas": setup.py reads these from
#   sys.argv. Without them (on any setup.py call, the metadata step included) it falls back to
#   numpy.distutils to find BLAS, which fails with current numpy + setuptools ("BLAS not found",
#   or `TypeError: Compiler.__init__()` with setuptools 84).
# - The build step first upgrades pip (and setuptools, ninja) inside the environment, because the
#   pip a fresh `python3 -m venv` ships on Python 3.11 (23.2.1) loses those settings:
#   * with the `wheel` package importable it builds this setup.py-only project the legacy way
#     (`setup.py egg_info` / `bdist_wheel`) and ignores --config-settings ("Config settings are
#     ignored for project MinkowskiEngine"): the metadata step fails;
#   * without `wheel` it uses setuptools' PEP 517 backend, which passes them to the metadata step
#     only with setuptools >= 84 (setuptools 65, what the venv ships, leaves them out).
#   pip 26 (26.2.1, 26.3 tested) always uses the PEP 517 backend; with setuptools >= 84 (84.2.1
#   tested) the metadata and build steps both receive the settings. The cached-wheel path needs
#   none of this (nor a compiler): any pip, 23.2.1 included, installs a wheel.
# - ninja: torch's extension builder compiles in parallel with it (MAX_JOBS jobs, default 2 here).
# - setup.py runs `pip uninstall MinkowskiEngine -y` itself; harmless, we install right after.
# - No source patch is needed for torch 2.14.1 (C++20, gcc 12.2): the CPU build compiles as is.
set -euo pipefail

ME_VERSION=0.5.4
PY=${PYTHON:-python}
CACHE_ROOT=${FCMAE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fcmae/wheels}

log() { echo "[install_minkowski] $*"; }
die() { echo "[install_minkowski] ERROR: $*" >&2; exit 1; }

if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then
    log "warning: no virtual environment is active; installing into $(command -v "$PY")"
fi
# the venv's bin first on PATH: setup.py calls `pip`, torch's extension builder calls `ninja`
PATH="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')"):$PATH"
export PATH
"$PY" -c "import torch" 2>/dev/null || die "torch is not importable with $PY; install the project first (pip install -e .)"

# Cache key: the extension links against libtorch, so a wheel is only valid for the same torch
# build and the same Python ABI.
KEY=$("$PY" - <<'EOF'
import sys, sysconfig, torch
tv = torch.__version__.replace("+", "_")
abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
print(f"torch-{tv}-cxx11abi{abi}-cp{sys.version_info[0]}{sys.version_info[1]}-{sysconfig.get_platform().replace('-', '_')}")
EOF
)
CACHE_DIR="$CACHE_ROOT/minkowskiengine-$ME_VERSION/$KEY"

verify() {
    "$PY" - <<'EOF'
import collections, collections.abc
# ME 0.5.4 does `from collections import Sequence`, removed in Python 3.10
for name in ("Sequence", "Mapping", "MutableMapping", "Iterable"):
    if not hasattr(collections, name):
        setattr(collections, name, getattr(collections.abc, name))
import warnings
import torch
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*compiled with CPU_ONLY.*")
    import MinkowskiEngine as ME
c = torch.tensor([[0, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.int32)
x = ME.SparseTensor(torch.ones(3, 2), coordinates=c)
y = ME.MinkowskiChannelwiseConvolution(2, kernel_size=3, dimension=2)(x)
assert y.F.shape == (3, 2), y.F.shape
print("MinkowskiEngine", ME.__version__, "OK; torch", torch.__version__)
EOF
}

install_cached() {
    local whl
    whl=$(ls "$CACHE_DIR"/[Mm]inkowski[Ee]ngine-"$ME_VERSION"-*.whl 2>/dev/null | head -n1 || true)
    [ -n "$whl" ] || return 1
    log "installing cached wheel $whl"
    "$PY" -m pip install -q --no-deps --force-reinstall "$whl" && verify
}

if install_cached; then
    exit 0
fi
if ls "$CACHE_DIR"/*.whl >/dev/null 2>&1; then
    log "cached wheel did not install or import; rebuilding"
    rm -f "$CACHE_DIR"/*.whl
fi

log "no cached wheel for $KEY; building MinkowskiEngine $ME_VERSION from source (6.5-33 min on 2 cores)"

# --- build dependencies ---
any_exists() { local f; for f in "$@"; do [ -e "$f" ] && return 0; done; return 1; }
have_openblas() {  # the linker needs libopenblas.so (dev symlink) and the sources include cblas.h
    any_exists /usr/lib/*/libopenblas.so /usr/lib/libopenblas.so /usr/lib64/libopenblas.so /usr/local/lib/libopenblas.so \
        && any_exists /usr/include/cblas.h /usr/include/*/cblas.h /usr/include/openblas/cblas.h /usr/local/include/cblas.h
}
if ! have_openblas; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        log "installing libopenblas-dev (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q libopenblas-dev >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libopenblas-dev >/dev/null; } \
            || die "apt-get install libopenblas-dev failed"
    else
        die "OpenBLAS development files (libopenblas.so, cblas.h) not found and cannot apt-get them (not root): install libopenblas-dev"
    fi
fi
command -v c++ >/dev/null || die "no C++ compiler (c++) found: install g++ (build-essential)"
log "build tools: pip>=26, setuptools>=84, ninja (pip upgrades only what is older or missing)"
"$PY" -m pip install -q "pip>=26" "setuptools>=84" ninja || die "pip install pip>=26 setuptools>=84 ninja failed"
log "build tools: $("$PY" -m pip --version | cut -d' ' -f1-2), setuptools $("$PY" -c 'import setuptools; print(setuptools.__version__)')"

# --- build the wheel ---
BUILD_DIR=$(mktemp -d "${TMPDIR:-/tmp}/me-build.XXXXXX")
trap 'rm -rf "$BUILD_DIR"' EXIT
BUILD_LOG="$BUILD_DIR/build.log"
start=$(date +%s)
if ! (cd "$BUILD_DIR" && MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip wheel -v "MinkowskiEngine==$ME_VERSION" \
        --no-binary MinkowskiEngine --no-build-isolation --no-deps --no-cache-dir -w "$BUILD_DIR/wheel" \
        --config-settings="--global-option=--cpu_only --blas=openblas" >"$BUILD_LOG" 2>&1); then
    cp "$BUILD_LOG" "${TMPDIR:-/tmp}/minkowski-build.log" || true
    grep -E " error|Error" "$BUILD_LOG" | tail -n 30 >&2 || true
    tail -n 30 "$BUILD_LOG" >&2
    die "MinkowskiEngine build failed (full log: ${TMPDIR:-/tmp}/minkowski-build.log)"
fi
log "built in $(( $(date +%s) - start )) s"
whl=$(ls "$BUILD_DIR"/wheel/[Mm]inkowski[Ee]ngine-"$ME_VERSION"-*.whl 2>/dev/null | head -n1 || true)
[ -n "$whl" ] || die "pip wheel produced no MinkowskiEngine wheel"

mkdir -p "$CACHE_DIR"
cp "$whl" "$CACHE_DIR/.tmp-$(basename "$whl")" && mv "$CACHE_DIR/.tmp-$(basename "$whl")" "$CACHE_DIR/$(basename "$whl")"
log "cached $CACHE_DIR/$(basename "$whl")"
install_cached || die "the freshly built wheel does not install or import"
