#!/usr/bin/env bash
# Download the wheels the GPU check (benchmarks/gpu_check.sh, step 0) installs on a
# GPU machine that has CuPy, PyTorch and JAX but no internet: the test tools and
# icgd's small pure-Python dependencies, with their own dependencies, for each Python
# version in PY_VERSIONS (hypothesis ships version-specific wheels). The folder is
# ignored by git (.gitignore) and travels with the working tree; keep it well under
# the 64 MiB a device run may carry (about 6 MiB for three Python versions).
#
#   bash benchmarks/gpu_wheels.sh                 into .gpu-wheels/
#   GPU_WHEELS=shared/wheels PY_VERSIONS=3.12 bash benchmarks/gpu_wheels.sh
#
# numba (llvmlite alone is ~60 MB) and matplotlib are not brought: without numba the
# test modules that import it are left out of step 2 (reported PARTIAL), and training
# runs with --no-plots.
set -eu
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEST=${GPU_WHEELS:-.gpu-wheels}
PY=${PYTHON:-python}
PY_VERSIONS=${PY_VERSIONS:-"3.10 3.11 3.12"}
PACKAGES="hypothesis pytest sortedcontainers iniconfig pluggy tqdm packaging setuptools wheel"   # setuptools, wheel: build the editable install without isolation
mkdir -p "$DEST"
for v in $PY_VERSIONS; do
    echo "# Python $v"
    extra=""
    # pip download evaluates dependency markers for the running Python, not --python-version:
    # what pytest / hypothesis need below 3.11 is named here
    case $v in 3.10|3.9) extra="exceptiongroup tomli typing_extensions" ;; esac
    "$PY" -m pip download --only-binary=:all: --python-version "$v" --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --implementation cp -d "$DEST" $PACKAGES $extra
done
ls -l "$DEST"
bytes=$(du -sb "$DEST" | cut -f1)
echo "# $DEST: $(ls "$DEST" | wc -l) wheels, $bytes bytes ($(( bytes / 1024 / 1024 )) MiB)"
if [ "$bytes" -gt $(( 32 * 1024 * 1024 )) ]; then
    echo "gpu_wheels: $DEST is over 32 MiB; a device run carries 64 MiB in all" >&2
    exit 1
fi
