#!/bin/sh
# azd prepackage hook (and the step to run before `func azure functionapp publish`): compile the
# app's own code to bytecode that Python validates by the source's hash, not its timestamp, so
# the package carries it. The Function App mounts its package read-only, where Python cannot
# cache what it compiles: without this, every cold start compiles every module of the app.
set -eu
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m compileall -q --invalidation-mode checked-hash function_app.py functions connector_core
echo "Compiled function_app.py, functions/ and connector_core/ to hash-checked bytecode."
