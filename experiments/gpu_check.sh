#!/usr/bin/env bash
# The core numerical tests (on JAX also the XLA and mixed-precision checks) and the step-time benchmark on a GPU, on JAX and PyTorch,
# and the stacked sweep's row (8 members in one model against 8 separate fits; JAX by default).
#
# Meant for the workplace's GPU machine (the `device` tool): Python 3.12 with
# JAX (CUDA), PyTorch, numpy, pytest, pytest-xdist, scikit-learn, rich, h5py,
# absl-py, ml-dtypes and packaging, but no Keras, namex, optree, TensorFlow or
# MLflow, and no network. Keras, namex, optree and keras_l2 itself travel as
# wheels in .whl/ and are installed into $SITE (default /tmp/site), which goes
# first on PYTHONPATH.
#
# 1. Here, once per edit of keras_l2/ (the wheel is checked against the source tree):
#        experiments/gpu_wheels.sh                 # CPython 3.12 wheels, for the GPU machine
#    which does, in the repo root:
#        echo /.whl/ >> .git/info/exclude          # once: .whl travels only when carried
#        rm -f .whl/*.whl
#        .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
#            -d .whl keras==3.15.1 namex==0.1.0 optree==0.20.0   # the versions `.venv/bin/pip show` gives
#        .venv/bin/python -m pip wheel --no-deps -w .whl .
# 2. Through the device tool (one call; the full run should take a few minutes):
#        run(command="bash experiments/gpu_check.sh", carry=[".whl"], timeout_s=540)
#    Only some parts, e.g. a rerun:  PARTS=bench BACKENDS=torch bash experiments/gpu_check.sh
#    QUICK=1 shrinks only the benchmark (the `digits` model, --quick); the tests run in full.
#    Everything is also written to $OUT/gpu_check.log when OUT is set (the tool sets it).
#    Other variables pass through: e.g. JAX_DEFAULT_MATMUL_PRECISION=highest turns off
#    JAX's TF32 matrix products on the GPU, to tell a TF32 tolerance failure from a real one.
# 3. A CPU dry run here needs a venv without TensorFlow, Keras and MLflow, and 3.11 wheels:
#        experiments/gpu_wheels.sh --python-version 3.11
#        PYTHON=/tmp/gpuvenv/bin/python QUICK=1 bash experiments/gpu_check.sh
#    (then rebuild the 3.12 wheels before a device call).
#
# Environment knobs:
#   QUICK=1            benchmark the small `digits` model with --quick (a dry run)
#   BACKENDS="jax torch"   which backends, in this order (empty: none)
#   PARTS="tests bench stacked"    which parts to run (empty: only install, versions and the exclusions)
#   PYTHON=python3     the interpreter (the GPU machine's python3 holds JAX and PyTorch)
#   SITE=/tmp/site     where the wheels are installed
#   PYTEST_WORKERS     pytest-xdist workers (default 8 with a GPU, else 1 = no xdist)
#   STEP_TIMEOUT=240   seconds for each test or benchmark step (then it is killed, and the rest go on)
#   DEADLINE=480       seconds from the start after which no step starts, and a running one is cut,
#                      so that the summary prints inside the device call's timeout_s (keep it 60 below)
#   BENCH_MODELS, BENCH_ARGS   override the benchmark's --models / add arguments
#   STACKED_BACKENDS=jax   the stacked row's backends;  STACKED_ROUNDS=3   its rounds (QUICK: 1)
#   ALLOW_CPU=1        go on when nvidia-smi sees a GPU but JAX or PyTorch does not
#   ALLOW_STALE_WHEEL=1   go on when the keras_l2 wheel differs from keras_l2/ here
#
# keras_l2 under test is the installed wheel, not the source tree: pytest runs
# from a copy of tests/ (and pyproject.toml, for the markers) in a temporary
# folder, so neither the current folder nor pytest-xdist's workers (which put
# their current folder first on sys.path) can import ./keras_l2; the log prints
# where keras_l2 was imported from. The benchmark runs as experiments/benchmark.py,
# whose sys.path[0] is experiments/, so it also imports the wheel.
# Test files that import, at module level, a module missing there (MLflow; TensorFlow)
# cannot even be collected; they are found by reading their imports, passed to
# --ignore, and listed in the log with the number of core marks they hold.
# The +logger benchmark variants need MLflow and are left out.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD

# Everything into $OUT/gpu_check.log as well, when OUT is set.
if [[ -n ${OUT:-} && -z ${GPU_CHECK_TEED:-} ]]; then
    mkdir -p "$OUT"
    export GPU_CHECK_TEED=1
    set +e
    bash "$0" "$@" 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi

PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
QUICK=${QUICK:-0}
BACKENDS=${BACKENDS-jax torch}
PARTS=${PARTS-tests bench stacked}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
DEADLINE=${DEADLINE:-480}
VARIANTS="none,none (A/A),keras_L2,keras_weight_decay,regularizer,loss,coupled,decoupled"  # A/A: the noise
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3

say() { printf '%s\n' "$*"; }
die() { printf 'gpu_check.sh: ERROR: %s\n' "$*" >&2; exit 1; }
banner() { printf '\n===== %s =====\n' "$*"; }

SUMMARY=()
FAILED=0
step() {  # step NAME CMD...: runs CMD, records ok / FAILED / TIMED OUT, never stops the script
    local name=$1 t0=$SECONDS rc=0
    shift
    banner "$name"
    # Each step gets STEP_TIMEOUT seconds, or what is left before DEADLINE (the summary must print).
    STEP_LIMIT=$((DEADLINE - SECONDS - 15))
    (( STEP_LIMIT <= STEP_TIMEOUT )) || STEP_LIMIT=$STEP_TIMEOUT
    if (( STEP_LIMIT < 20 )); then
        say "SKIPPED: only $((DEADLINE - SECONDS)) s left before DEADLINE=${DEADLINE}s"
        SUMMARY+=("$(printf '%-26s %s' "$name" "SKIPPED (DEADLINE=${DEADLINE}s reached)")")
        FAILED=1
        return 0
    fi
    "$@" || rc=$?
    local verdict=ok
    if [[ $rc == 124 || $rc == 137 ]]; then verdict="TIMED OUT (after ${STEP_LIMIT}s)"
    elif [[ $rc != 0 ]]; then verdict="FAILED (rc=$rc)"; fi
    [[ $rc == 0 ]] || FAILED=1
    SUMMARY+=("$(printf '%-26s %-34s %4ds  %s' "$name" "$verdict" $((SECONDS - t0)) "${STEP_NOTE:-}")")
    STEP_NOTE=
}

banner "gpu_check.sh $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname), $(uname -m), $(nproc) CPUs"
say "repo: $REPO   python: $(command -v "$PY") ($("$PY" -V 2>&1))   QUICK=$QUICK   BACKENDS=$BACKENDS   PARTS=$PARTS"

# ---------------------------------------------------------------- install
banner "install .whl/ into $SITE"
shopt -s nullglob
wheels=(.whl/*.whl)
shopt -u nullglob
[[ ${#wheels[@]} -gt 0 ]] || die "no wheels in .whl/: run experiments/gpu_wheels.sh on the dev machine and name .whl in the device call's carry"
for name in keras namex optree keras_l2; do
    shopt -s nullglob; found=(.whl/"$name"-*.whl); shopt -u nullglob
    [[ ${#found[@]} == 1 ]] || die "expected exactly one $name wheel in .whl/, found ${#found[@]}: ${found[*]:-none} (rerun experiments/gpu_wheels.sh)"
done
printf '  %s\n' "${wheels[@]}"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
    || die "pip could not install .whl/ (wheels for another Python? gpu_wheels.sh --python-version must match $("$PY" -V 2>&1))"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if ! diff -rq -x __pycache__ keras_l2 "$SITE/keras_l2"; then
    if [[ ${ALLOW_STALE_WHEEL:-0} == 1 ]]; then
        say "WARNING: the keras_l2 wheel differs from keras_l2/ (above); going on because ALLOW_STALE_WHEEL=1"
    else
        die "the keras_l2 wheel differs from keras_l2/ (above): rebuild it with experiments/gpu_wheels.sh (or ALLOW_STALE_WHEEL=1)"
    fi
else
    say "keras_l2 wheel == keras_l2/ in this tree"
fi

# ---------------------------------------------------------------- GPU and versions
RUNDIR=$(mktemp -d /tmp/gpu_check_tests.XXXXXX)  # pytest's folder, and the logs
trap 'rm -rf "$RUNDIR"' EXIT
banner "GPU and versions"
GPU_EXPECTED=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; then
    GPU_EXPECTED=1
else
    say "nvidia-smi: no GPU found (a CPU dry run?)"
fi
# One process, so no preallocation: JAX would take 75% of the GPU's memory at start.
# From $RUNDIR: `python -` puts the current folder first on sys.path, and ./keras_l2 would win.
rc=0
(cd "$RUNDIR" && XLA_PYTHON_CLIENT_PREALLOCATE=false KERAS_BACKEND=jax GPU_EXPECTED=$GPU_EXPECTED "$PY" -) <<'EOF' || rc=$?
import os, sys
print(f"python   {sys.version.split()[0]}  {sys.executable}")
import numpy
print(f"numpy    {numpy.__version__}")
import jax
jax_backend = jax.default_backend()
print(f"jax      {jax.__version__}  default_backend={jax_backend}  devices={jax.devices()}")
import torch
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if cuda else "-"
print(f"torch    {torch.__version__}  cuda={torch.version.cuda}  available={cuda}  device={name}  "
      f"tf32 matmul={torch.backends.cuda.matmul.allow_tf32}")
import keras, optree, keras_l2
print(f"keras    {keras.__version__}  {os.path.dirname(keras.__file__)}")
print(f"optree   {optree.__version__}")
print(f"keras_l2 {os.path.dirname(keras_l2.__file__)}")
try:
    import mlflow  # noqa: F401
    print("mlflow   importable")
except ImportError:
    print("mlflow   not installed")
if os.environ["GPU_EXPECTED"] == "1" and (jax_backend != "gpu" or not cuda):
    print(f"ERROR: nvidia-smi sees a GPU but jax uses {jax_backend!r} and torch.cuda.is_available()={cuda}")
    sys.exit(3)
EOF
if [[ $rc == 3 ]]; then
    [[ ${ALLOW_CPU:-0} == 1 ]] || die "a GPU is there but JAX or PyTorch does not use it (ALLOW_CPU=1 to go on anyway)"
    say "going on on the CPU: ALLOW_CPU=1"
elif [[ $rc != 0 ]]; then
    die "the imports above failed (rc=$rc): the GPU machine's Python lacks something keras needs?"
fi

if [[ -z ${PYTEST_WORKERS:-} ]]; then
    PYTEST_WORKERS=$([[ $GPU_EXPECTED == 1 ]] && echo 8 || echo 1)
fi

# ---------------------------------------------------------------- tests
IGNORES=()
if [[ " $PARTS " == *" tests "* ]]; then
    banner "test files that cannot be collected here"
    # A module-level import of a module missing here (mlflow, tensorflow, ...) makes a file fail
    # at collection, which `-m core` does not prevent: such files are ignored, loudly.
    mapfile -t excluded < <("$PY" - <<'EOF'
import ast, importlib.util, pathlib
local = {"tests", "conftest"} | {p.stem for p in pathlib.Path("tests").glob("*.py")}
def missing_here(name):
    return name not in local and importlib.util.find_spec(name) is None
for path in sorted(pathlib.Path("tests").glob("test_*.py")):
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:  # module level only: imports inside a test run only when it runs
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    needs = sorted(n for n in names if missing_here(n))
    if needs:
        core = path.read_text().count("mark.core")
        print(f"{path}\t{','.join(needs)}\t{core}")
EOF
    )
    if [[ ${#excluded[@]} == 0 ]]; then
        say "none"
    fi
    for line in "${excluded[@]}"; do
        IFS=$'\t' read -r file needs core <<<"$line"
        IGNORES+=("--ignore=$file")
        if [[ $core == 0 ]]; then what="no core tests"; else what="$core core mark(s) LOST here"; fi
        say "EXCLUDED $file: imports $needs at module level, which is not installed here ($what)"
    done
    cp -r tests pyproject.toml "$RUNDIR"/
    find "$RUNDIR" -name __pycache__ -prune -exec rm -rf {} +
    (cd "$RUNDIR" && KERAS_BACKEND=jax "$PY" -c 'import keras_l2; print("keras_l2 as the tests import it:", keras_l2.__path__[0])')
    say "pytest runs in $RUNDIR (a copy of tests/ and pyproject.toml) with ${PYTEST_WORKERS} worker(s)"
fi

run_tests() {  # run_tests BACKEND: the core tests on BACKEND, from the copy in $RUNDIR
    local backend=$1 xdist=() log="$RUNDIR/pytest_$1.log" rc=0
    # --dist load, not the Makefile's loadfile: test_routes.py alone would otherwise keep
    # one worker busy for most of the run (test_mixed_precision.py's module fixture is
    # then computed once per worker that runs its tests: slower, not wrong).
    [[ $PYTEST_WORKERS -gt 1 ]] && xdist=(-n "$PYTEST_WORKERS" --dist load)
    local env=(KERAS_BACKEND="$backend" XLA_PYTHON_CLIENT_PREALLOCATE=false)
    # On JAX also the XLA and mixed-precision checks (marker deploy), as `make test` runs them;
    # tests marked mlflow need MLflow, which is not there.
    local markers="core and not mlflow"
    [[ $backend == jax ]] && env+=(JAX_ENABLE_X64=1) && markers="(core or deploy) and not mlflow"
    say "${env[*]} $PY -m pytest -m \"$markers\" -q -p no:cacheprovider ${xdist[*]} ${IGNORES[*]}"
    (cd "$RUNDIR" && env "${env[@]}" timeout -k 10 "$STEP_LIMIT" "$PY" -m pytest -m "$markers" -q -p no:cacheprovider \
        "${xdist[@]}" "${IGNORES[@]}") 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}
    STEP_NOTE=$(grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected)' "$log" | tail -n 1 | sed 's/^=* *//; s/ *=*$//' || true)
    return "$rc"
}

run_bench() {  # run_bench BACKEND
    local backend=$1 jit=on models=mlp4096 quick=() extra=() log="$RUNDIR/bench_$1.log" rc=0
    [[ $backend == torch ]] && jit=off
    if [[ $QUICK == 1 ]]; then models=digits; quick=(--quick); fi
    models=${BENCH_MODELS:-$models}
    # shellcheck disable=SC2206
    extra=(${BENCH_ARGS:-})
    local cmd=("$PY" experiments/benchmark.py --models "$models" --jit "$jit" --variants "$VARIANTS" "${quick[@]}" "${extra[@]}")
    say "KERAS_BACKEND=$backend ${cmd[*]}"
    say "(float32, JAX without x64; the +logger variants need mlflow and are left out)"
    KERAS_BACKEND=$backend timeout -k 10 "$STEP_LIMIT" "${cmd[@]}" 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}
    return "$rc"
}

if [[ " $PARTS " == *" tests "* ]]; then
    for backend in $BACKENDS; do step "tests ($backend)" run_tests "$backend"; done
fi
if [[ " $PARTS " == *" bench "* ]]; then
    for backend in $BACKENDS; do step "benchmark ($backend)" run_bench "$backend"; done
fi
# The stacked sweep's row: 8 members of 784-1024-1024-10 at batch 256 in one model, against 8 separate fits,
# building, the whole fit, its first epoch and the later ones timed apart. JAX preallocates nothing, as in the
# tests (the stack shares the GPU with nothing else here).
run_stacked() {  # run_stacked BACKEND
    local rounds=${STACKED_ROUNDS:-3}
    [[ $QUICK == 1 ]] && rounds=1
    say "KERAS_BACKEND=$1 XLA_PYTHON_CLIENT_PREALLOCATE=false $PY experiments/stacked_benchmark.py --fit-only --rounds $rounds"
    KERAS_BACKEND=$1 XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -k 10 "$STEP_LIMIT" \
        "$PY" experiments/stacked_benchmark.py --fit-only --rounds "$rounds" 2>&1 | tee "$RUNDIR/stacked_$1.log"
    return "${PIPESTATUS[0]}"
}
if [[ " $PARTS " == *" stacked "* ]]; then
    for backend in ${STACKED_BACKENDS:-jax}; do step "stacked sweep ($backend)" run_stacked "$backend"; done
fi

banner "summary"
[[ ${#IGNORES[@]} == 0 ]] || say "excluded (need modules missing here): ${IGNORES[*]//--ignore=/}"
[[ ${#SUMMARY[@]} == 0 ]] || printf '%s\n' "${SUMMARY[@]}"
if [[ $FAILED == 0 ]]; then say "gpu_check.sh: all steps ok"; else say "gpu_check.sh: SOME STEPS FAILED"; fi
exit "$FAILED"
