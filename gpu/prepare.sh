#!/usr/bin/env bash
# Fill .carry/ (git-ignored) with what gpu/run.sh needs on the GPU machine; prints the sizes and fails
# when the carry plus the working tree exceed the device call's 64 MiB. Needs a built model_repository/
# (make build) and PyPI (numpy 1.26.4 for the stub, tritonclient, python-rapidjson, emoji, tritonclient 2.50.0).
#   gpu/prepare.sh                      # for the GPU machine (Python 3.12)
#   gpu/prepare.sh --python 3.11 --carry /tmp/carry311   # to try gpu/run.sh on this machine
# Arguments go to `python -m mtl_tools.gpu prepare` (--model-repository, --sentences).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
cd "$REPO"
exec "$PY" -m mtl_tools.gpu prepare "$@"
