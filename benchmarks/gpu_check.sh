#!/usr/bin/env bash
# The whole GPU check (issue #19) in ranked steps, each under its own `timeout`; a
# step that fails or times out is recorded and the next one runs anyway. Every output
# goes under $OUT (default ./gpu-check-out); a pass/fail summary ends the run and is
# written to $OUT/SUMMARY.txt.
#
#   bash benchmarks/gpu_check.sh                        all steps
#   OUT=/tmp/gc GPU_CHECK_STEPS="1 2" bash benchmarks/gpu_check.sh
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh    print the commands only
#
# Steps (rank order; 1-4 fit in about 8 minutes with the default timeouts):
#   0   install: wheels from $GPU_WHEELS (benchmarks/gpu_wheels.sh), then
#       pip install --no-deps --no-build-isolation -e .   (the GPU machine has CuPy,
#       PyTorch and JAX but no internet; if the editable install fails, later steps
#       still run from the tree via PYTHONPATH)
#   1   import CuPy: GPU, compute capability, memory, driver and CUDA runtime versions
#   2   python -m pytest -m gpu -rs -x tests/      (fails if any test is skipped;
#       PARTIAL if a test module cannot be imported here, e.g. numba absent)
#   3a  icgd train one_layer --backend cupy, full length (5000 steps)
#   3b  python -m benchmarks.gpu_step_check: step_on of the CuPy stepper against the
#       NumPy backend on identical tasks, float32 tolerance, configs a, b, c
#   4   python -m benchmarks.gpu, configs a, b, c: icgd-cupy and icgd-cupy-reference
#       against jax-jit and torch-eager
#   5   python -m benchmarks.gpu --large (d=64 N=512 B=4096 K=8; config a at
#       B=65536): verified in float64 at --verify-batch tasks, timed at full size
#   6   profile: nsys (when installed) or cProfile of config c, icgd-cupy
#
# Environment: OUT, PYTHON (default python), GPU_WHEELS (default .gpu-wheels),
# GPU_CHECK_STEPS (space-separated ids, default all), GPU_CHECK_DRY_RUN=1,
# GPU_CHECK_T0 .. GPU_CHECK_T6, GPU_CHECK_T3A, GPU_CHECK_T3B (seconds per step).
# The commit is `git rev-parse HEAD`, or the file COMMIT at the repository root when
# the tree has no .git (write it before copying: git rev-parse HEAD > COMMIT).
# Exit status: 0 every step run passed (PARTIAL counts as passed), 1 otherwise.

set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
OUT=${OUT:-./gpu-check-out}
PY=${PYTHON:-python}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
DRY=${GPU_CHECK_DRY_RUN:-0}
ALL_STEPS="0 1 2 3a 3b 4 5 6"
STEPS=${GPU_CHECK_STEPS:-$ALL_STEPS}

T0=${GPU_CHECK_T0:-90}
T1=${GPU_CHECK_T1:-30}
T2=${GPU_CHECK_T2:-150}
T3A=${GPU_CHECK_T3A:-100}
T3B=${GPU_CHECK_T3B:-45}
T4=${GPU_CHECK_T4:-150}
T5=${GPU_CHECK_T5:-150}
T6=${GPU_CHECK_T6:-90}

mkdir -p "$OUT" || { echo "gpu_check: cannot create OUT=$OUT" >&2; exit 1; }
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# -- the commit, first ------------------------------------------------------------------
if COMMIT=$(git -C "$REPO" rev-parse HEAD 2>/dev/null); then
    SRC="git rev-parse HEAD"
    git -C "$REPO" status --short > "$OUT/git-status.txt" 2>&1 || true
elif [ -s "$REPO/COMMIT" ]; then
    COMMIT=$(head -n 1 "$REPO/COMMIT"); SRC="COMMIT file"
else
    COMMIT=unknown; SRC="no .git and no COMMIT file"
fi
echo "$COMMIT" > "$OUT/COMMIT"
echo "# gpu_check: commit $COMMIT ($SRC); output in $OUT; steps: $STEPS"
[ "$DRY" = 1 ] && echo "# GPU_CHECK_DRY_RUN=1: commands are printed, not run"

# -- the step runner -----------------------------------------------------------------------
SUMMARY=()
FAILED=0

wanted() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# run_step ID NAME TIMEOUT COMMAND: COMMAND (a bash string) under `timeout`, output
# to the terminal and to $OUT/step-ID-NAME.log. Exit 3 from COMMAND means PARTIAL.
run_step() {
    local id=$1 name=$2 t=$3 cmd=$4 log status rc start secs
    wanted "$id" || return 0
    log="$OUT/step-$id-$name.log"
    echo
    echo "=== step $id: $name (timeout ${t}s) ==="
    echo "+ $cmd"
    if [ "$DRY" = 1 ]; then
        SUMMARY+=("$(printf '%-3s %-14s %-9s %4ss  (dry run)' "$id" "$name" DRY "$t")")
        return 0
    fi
    start=$(date +%s)
    timeout -k 10 "$t" bash -c "$cmd" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    secs=$(( $(date +%s) - start ))
    case $rc in
        0) status=PASS ;;
        3) status=PARTIAL ;;
        124|137) status=TIMEOUT; FAILED=1 ;;
        *) status=FAIL; FAILED=1 ;;
    esac
    echo "=== step $id: $status (rc $rc, ${secs}s) ==="
    SUMMARY+=("$(printf '%-3s %-14s %-9s %4ss  rc %-3s  %s' "$id" "$name" "$status" "$secs" "$rc" "${log#"$OUT"/}")")
}

Q() { printf '%q' "$1"; }   # quote a path for the command strings
QOUT=$(Q "$OUT")
QPY=$(Q "$PY")

# -- 0: install ----------------------------------------------------------------------------
run_step 0 install "$T0" "
set -e
$QPY -c 'import sys, platform; print(\"python\", sys.version.split()[0], platform.platform())'
if [ -d $(Q "$WHEELS") ]; then
    echo \"wheels from $WHEELS: \$(ls $(Q "$WHEELS") | wc -l) files, \$(du -sh $(Q "$WHEELS") | cut -f1)\"
    $QPY -m pip install --no-index --find-links $(Q "$WHEELS") hypothesis pytest sortedcontainers iniconfig pluggy tqdm packaging 'setuptools>=68' wheel
else
    echo \"no wheel folder $WHEELS (benchmarks/gpu_wheels.sh makes it); using what is installed\"
fi
$QPY -m pip install --no-deps --no-build-isolation -e . || { echo 'editable install failed: later steps run from the tree (PYTHONPATH)'; exit 1; }
$QPY -m pip list 2>/dev/null > $QOUT/pip-list.txt || true
$QPY -c 'import numpy, pytest, hypothesis, tqdm; print(\"numpy\", numpy.__version__, \"pytest\", pytest.__version__, \"hypothesis\", hypothesis.__version__)'
"

# -- 1: CuPy and the GPU -----------------------------------------------------------------------
run_step 1 cupy-info "$T1" "
command -v nvidia-smi >/dev/null && nvidia-smi > $QOUT/nvidia-smi.txt 2>&1
$QPY - <<'EOF'
import cupy
rt = cupy.cuda.runtime
n = rt.getDeviceCount()
props = rt.getDeviceProperties(0)
name = props['name'].decode() if isinstance(props['name'], bytes) else props['name']
free, total = cupy.cuda.Device(0).mem_info
v = lambda x: f'{x // 1000}.{x % 1000 // 10}'
print(f'devices {n}; GPU 0: {name}, cc {props[\"major\"]}.{props[\"minor\"]}, {props[\"multiProcessorCount\"]} SMs, '
      f'{total / 2**30:.1f} GiB ({free / 2**30:.1f} free)')
print(f'driver CUDA {v(rt.driverGetVersion())}, runtime CUDA {v(rt.runtimeGetVersion())}, CuPy {cupy.__version__}')
x = cupy.arange(10, dtype=cupy.float32)
assert float((x * x).sum()) == 285.0
print('a kernel ran: ok')
EOF
"

# -- 2: the tests marked gpu ---------------------------------------------------------------------
run_step 2 pytest-gpu "$T2" "
ignores=\$($QPY - <<'EOF'
import glob, importlib, os, sys
sys.path.insert(0, 'tests')
for f in sorted(glob.glob('tests/test_*.py')):
    try:
        importlib.import_module(os.path.basename(f)[:-3])
    except ModuleNotFoundError as exc:
        print(f'--ignore={f}')
        print(f'cannot import {f}: {exc}; its tests do not run', file=sys.stderr)
EOF
)
set -o pipefail
$QPY -m pytest -m gpu -rs -x -q -p no:cacheprovider \$ignores tests/ | tee $QOUT/pytest-gpu.txt
rc=\${PIPESTATUS[0]}
[ \$rc -ne 0 ] && exit \$rc
if tail -n 3 $QOUT/pytest-gpu.txt | grep -Eq '[0-9]+ skipped'; then echo 'FAIL: tests were skipped (expected 0 skipped)'; exit 5; fi
[ -n \"\$ignores\" ] && { echo \"PARTIAL: not run: \$ignores\"; exit 3; }
exit 0
"

# -- 3: training at full length, and step_on against the NumPy backend -------------------------
run_step 3a train-cupy "$T3A" "
icgd_() { if command -v icgd >/dev/null; then icgd \"\$@\"; else $QPY -c 'import sys; from verify.cli import main; sys.exit(main())' \"\$@\"; fi; }
icgd_ train one_layer --backend cupy --out $QOUT/run-one_layer-cupy --overwrite --no-plots
"

run_step 3b step-check "$T3B" "
$QPY -m benchmarks.gpu_step_check --engine cupy --configs a,b,c --steps 3 --json $QOUT/step-check.json
"

# -- 4: the benchmark, configs a, b, c --------------------------------------------------------------
run_step 4 bench-abc "$T4" "
$QPY -m benchmarks.gpu --configs a,b,c --impls icgd-cupy,icgd-cupy-reference,jax-jit,torch-eager \
    --warmup 5 --repeats 20 --json $QOUT/bench-abc.json
"

# -- 5: the configurations that fill the GPU ----------------------------------------------------------
run_step 5 bench-large "$T5" "
$QPY -m benchmarks.gpu --large --impls icgd-cupy,jax-jit,torch-eager,icgd-cupy-reference \
    --verify-batch 16 --warmup 3 --repeats 10 --json $QOUT/bench-large.json
"

# -- 6: a per-part profile ----------------------------------------------------------------------------------
run_step 6 profile "$T6" "
$QPY -c 'from reference.backends import get_backend; get_backend(\"cupy\").require_cupy()' || exit 2
args='-m benchmarks.gpu --configs c --impls icgd-cupy --warmup 3 --repeats 5'
if command -v nsys >/dev/null; then
    nsys profile --stats=true --force-overwrite=true -o $QOUT/profile-c $QPY \$args > $QOUT/profile-nsys.txt 2>&1
    rc=\$?; tail -n 80 $QOUT/profile-nsys.txt; exit \$rc
fi
echo 'nsys not installed: cProfile of the host side (device time shows up in synchronize)'
$QPY -m cProfile -s cumtime \$args > $QOUT/profile-cprofile.txt 2>&1
rc=\$?; head -n 60 $QOUT/profile-cprofile.txt; exit \$rc
"

# -- summary --------------------------------------------------------------------------------------------------
{
    echo
    echo "=== gpu_check summary: commit $COMMIT ($SRC) ==="
    for line in "${SUMMARY[@]}"; do echo "$line"; done
} | tee "$OUT/SUMMARY.txt"
[ "$DRY" = 1 ] && exit 0
exit $FAILED
