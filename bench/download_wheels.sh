#!/usr/bin/env bash
# Downloads, where there is network, the wheels bench/gpu_check.sh installs on a GPU machine that has none.
#
# Usage:
#   bench/download_wheels.sh [--python-version 3.11] [--dest bench/wheels] [--dry-run] [EXTRA_PACKAGE ...]
#   then copy the repository with bench/wheels/ (ignored by git) to the GPU machine and run bench/gpu_check.sh OUT_DIR
#
# Wheels for the GPU machine's platform, not this one's: manylinux x86_64, CPython --python-version (the Python of the
# CUDA torch there: `python -c "import sys; print(sys.version)"` on it). Downloaded:
#   - liger-kernel 0.8.5 and cut-cross-entropy 25.1.1 (PyPI's names), without dependencies: both are pure Python and
#     need only torch and triton, which come with the CUDA torch of the GPU image;
#   - matplotlib (for the PNG plots) with its dependencies; pip skips those the GPU machine already has;
#   - EXTRA_PACKAGE ...: anything else the GPU image lacks, with its dependencies (e.g. pyyaml).
# --dry-run prints the pip commands without running them. PYTHON: the interpreter whose pip runs (default python3).
set -euo pipefail

PYTHON_VERSION=3.11
DEST="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/wheels"
DRY_RUN=0
EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --python-version) PYTHON_VERSION="${2:?--python-version needs a value like 3.11}"; shift 2 ;;
        --dest) DEST="${2:?--dest needs a folder}"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "download_wheels.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) EXTRA+=("$1"); shift ;;
    esac
done
if ! [[ "$PYTHON_VERSION" =~ ^3\.[0-9]+$ ]]; then
    echo "download_wheels.sh: error: --python-version: expected 3.N, got $PYTHON_VERSION" >&2
    exit 2
fi
ABI="cp${PYTHON_VERSION/./}"
PLATFORM=(--only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux_2_28_x86_64 --python-version "$PYTHON_VERSION" --implementation cp
          --abi "$ABI" --abi abi3 --abi none --dest "$DEST")
PIP=("${PYTHON:-python3}" -m pip download)

run() {
    echo "+ $*"
    [ "$DRY_RUN" = 1 ] || "$@"
}

[ "$DRY_RUN" = 1 ] || mkdir -p "$DEST"
run "${PIP[@]}" "${PLATFORM[@]}" --no-deps liger-kernel==0.8.5 cut-cross-entropy==25.1.1
run "${PIP[@]}" "${PLATFORM[@]}" matplotlib "${EXTRA[@]}"
[ "$DRY_RUN" = 1 ] || echo "wheels in $DEST: $(ls "$DEST" | wc -l); copy the folder to the GPU machine's bench/wheels/"
