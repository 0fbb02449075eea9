#!/usr/bin/env bash
# Builds .whl/ here: the wheels that experiments/gpu_check.sh installs on a GPU
# machine that has no Keras and no network (see experiments/gpu_check.sh).
#
#   experiments/gpu_wheels.sh                        # for the GPU machine's Python 3.12
#   experiments/gpu_wheels.sh --python-version 3.11  # for a dry run in a local Python 3.11 venv
#
# It puts into .whl/ (after deleting the *.whl already there, so that only one
# version of each travels):
#   - keras, namex, optree at the versions .venv has (`.venv/bin/pip show`),
#     fetched with `pip download --no-deps --only-binary=:all:` for the given
#     CPython version and manylinux x86-64;
#   - keras_l2 itself, built from this working tree (uncommitted edits included)
#     with `.venv/bin/python -m pip wheel --no-deps -w .whl .`.
# It also adds /.whl/ to .git/info/exclude (once), so the wheels are carried only
# when a device call names `.whl` in carry. Rebuild after every edit under
# keras_l2/: gpu_check.sh refuses a wheel that differs from the source tree.
#
# Options / environment:
#   --python-version X.Y   target CPython (default 3.12, the GPU machine's)
#   --dest DIR             output folder (default .whl)
#   VENV=path              the project venv whose versions are copied (default .venv)
set -euo pipefail

cd "$(dirname "$0")/.."
PYVER=3.12
DEST=.whl
VENV=${VENV:-.venv}
while [[ $# -gt 0 ]]; do
    case $1 in
        --python-version) PYVER=$2; shift 2 ;;
        --python-version=*) PYVER=${1#*=}; shift ;;
        --dest) DEST=$2; shift 2 ;;
        --dest=*) DEST=${1#*=}; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_wheels.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
[[ $PYVER =~ ^3\.[0-9]+$ ]] || { echo "gpu_wheels.sh: --python-version must look like 3.12, got '$PYVER'" >&2; exit 2; }
PY="$VENV/bin/python"
[[ -x $PY ]] || { echo "gpu_wheels.sh: no $PY (make setup first, or set VENV=)" >&2; exit 1; }

# The wheels must not travel with every device call: only when carry names .whl.
if [[ -d .git && $DEST != /* ]] && ! grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null; then
    echo "/$DEST/" >> .git/info/exclude
    echo "added /$DEST/ to .git/info/exclude"
fi

version() {  # the version of $1 installed in the venv
    "$PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'
}
specs=()
for name in keras namex optree; do
    v=$(version "$name")
    [[ -n $v ]] || { echo "gpu_wheels.sh: $name is not installed in $VENV" >&2; exit 1; }
    specs+=("$name==$v")
done

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
echo "== downloading ${specs[*]} for CPython $PYVER, manylinux x86_64"
"$PY" -m pip download -q --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" "${specs[@]}"

echo "== building the keras_l2 wheel from this working tree"
had_build=$([[ -e build ]] && echo 1 || true)
"$PY" -m pip wheel -q --no-deps -w "$DEST" .
[[ -n $had_build ]] || rm -rf build  # setuptools' in-tree build folder, if this run made it

echo "== $DEST/ (carry it: carry=[\"$DEST\"])"
ls -l "$DEST"
du -sh "$DEST"
# What keras needs besides namex and optree (the GPU image should already have these).
echo "keras needs: $(unzip -p "$DEST"/keras-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' | tr '\n' ' ')"
