#!/usr/bin/env bash
# The client's tests under numpy 2: a venv of their own (./client[plot] with numpy 2, as a user installs it),
# against a real Triton started from the project venv (the server's python stub needs numpy<2).
#
# Usage: client/ci/test-numpy2.sh [REPOSITORY [PROJECT]] [-- PYTEST_ARGS...]
#   REPOSITORY  a model repository built from the tests' project (default $MTL_TEST_REPOSITORY); when neither
#               is given, the tests' project is built here first with the project venv (~80 s)
#   PROJECT     the folder of that project's config.yaml and validation.csv (default $MTL_TEST_PROJECT, else
#               REPOSITORY's parent folder when it holds a config.yaml)
# Environment:
#   MTL_NUMPY2_PYTHON   interpreter of the numpy-2 venv (default: the newest of python3.13, 3.12, 3.11 found)
#   MTL_NUMPY2_VERSION  numpy to install (default 2.5.5 on Python >= 3.12, 2.4.6 on 3.11)
#   MTL_NUMPY2_VENV     the venv's folder, reused between runs (default ${TMPDIR:-/tmp}/mtl-client-numpy2-pyX.Y)
#   MTL_MAIN_VENV       the project venv that runs the build and the server (default .venv)
# Exit status: pytest's (0 when every test passed); 2 for a bad setup (no interpreter, server did not start).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
MAIN_VENV=${MTL_MAIN_VENV:-$ROOT/.venv}

REPOSITORY=${MTL_TEST_REPOSITORY:-}
PROJECT=${MTL_TEST_PROJECT:-}
if [ $# -gt 0 ] && [ "$1" != "--" ]; then REPOSITORY=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" != "--" ]; then PROJECT=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" = "--" ]; then shift; fi

fail() { echo "test-numpy2: error: $*" >&2; exit 2; }

# -- the interpreter: the newest CPython found on PATH or under pyenv -------------------------------------
find_python() {
    local version candidate
    for version in 3.13 3.12 3.11; do
        for candidate in "python$version" "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/"$version"*/bin/"python$version"; do
            if "$candidate" -c 'import sys, venv' >/dev/null 2>&1; then
                command -v "$candidate" 2>/dev/null || echo "$candidate"
                return
            fi
        done
    done
}
PYTHON=${MTL_NUMPY2_PYTHON:-$(find_python)}
[ -n "$PYTHON" ] || fail "no python3.11 or newer found (set MTL_NUMPY2_PYTHON)"
PY_VERSION=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then DEFAULT_NUMPY=2.5.5; else DEFAULT_NUMPY=2.4.6; fi
NUMPY_VERSION=${MTL_NUMPY2_VERSION:-$DEFAULT_NUMPY}
VENV=${MTL_NUMPY2_VENV:-${TMPDIR:-/tmp}/mtl-client-numpy2-py$PY_VERSION}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mtl-client-numpy2.XXXXXX")
SERVER_PID=
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" && wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# -- the numpy-2 venv: ./client with its ranges, numpy pinned ------------------------------------------
echo "test-numpy2: Python $PY_VERSION ($PYTHON), numpy $NUMPY_VERSION, venv $VENV"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -qq --disable-pip-version-check "numpy==$NUMPY_VERSION" "pytest==9.0.3" \
    "pytest-timeout==2.4.0" "PyYAML==6.0.3" "$ROOT/client[plot]"
# The same version number as an earlier run's copy: install this tree's code over it.
"$VENV/bin/python" -m pip install -qq --disable-pip-version-check --no-deps --force-reinstall "$ROOT/client"
"$VENV/bin/python" -c "import numpy, sys; sys.exit(numpy.__version__ != '$NUMPY_VERSION')" \
    || fail "the venv has numpy $("$VENV/bin/python" -c 'import numpy; print(numpy.__version__)'), not $NUMPY_VERSION"

"$VENV/bin/python" -c 'import importlib.metadata as m; print("test-numpy2: installed " + ", ".join(
    f"{name} {m.version(name)}" for name in ("mtl-client", "numpy", "tritonclient", "grpcio", "click", "matplotlib")))'

# -- the tests' project and its model repository ---------------------------------------------------------
if [ -z "$REPOSITORY" ]; then
    echo "test-numpy2: building the tests' project into $WORK"
    "$MAIN_VENV/bin/python" client/ci/build_test_project.py "$WORK" || fail "the build of the tests' project failed"
    REPOSITORY=$WORK/repo
    PROJECT=${PROJECT:-$WORK/project}
fi
[ -d "$REPOSITORY" ] || fail "model repository $REPOSITORY does not exist"
if [ -z "$PROJECT" ] && [ -f "$(dirname "$REPOSITORY")/config.yaml" ]; then PROJECT=$(dirname "$REPOSITORY"); fi
[ -f "${PROJECT:-/nonexistent}/config.yaml" ] || fail "no project config.yaml for $REPOSITORY (pass PROJECT or MTL_TEST_PROJECT)"

# -- a real server from the project venv, on free ports ----------------------------------------------------
PYTHONUNBUFFERED=1 "$MAIN_VENV/bin/mtl-serve" --model-repository "$REPOSITORY" --grpc-port 0 --http-port 0 \
    --metrics-port 0 --log-file "$WORK/triton.log" >"$WORK/serve.out" 2>"$WORK/serve.err" &
SERVER_PID=$!
for _ in $(seq 1 600); do
    grep -q "^ready in" "$WORK/serve.out" 2>/dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/serve.err" >&2; fail "mtl-serve exited during start-up"; }
    sleep 0.5
done
URL=$(awk '$1 == "gRPC" {print $2; exit}' "$WORK/serve.out")
[ -n "$URL" ] || { cat "$WORK/serve.out" "$WORK/serve.err" >&2; fail "mtl-serve did not become ready in 300 s"; }
echo "test-numpy2: server ready at $URL (repository $REPOSITORY)"

# -- the focused set: predict, evaluate and the API through gRPC, plus the reader, writer and contract --------
TESTS=(tests/client/test_cli_e2e.py tests/client/test_evaluate.py tests/client/test_api_e2e.py
       tests/client/test_contract.py tests/client/test_csv_input.py tests/client/test_writer.py
       tests/client/test_batching.py tests/client/test_cli_offline.py)
# --confcutdir: tests/conftest.py needs the server's packages; client/ci/numpy2_fixtures.py stands in for it.
set +e
MTL_CLIENT_TEST_URL=$URL MTL_TEST_PROJECT=$PROJECT MTL_EXPECT_NUMPY=2 PYTHONPATH=$ROOT/client/ci \
    "$VENV/bin/python" -m pytest -p numpy2_fixtures --confcutdir "$ROOT/tests/client" -p no:cacheprovider -q \
    "${TESTS[@]}" "$@"
status=$?
set -e
exit $status
