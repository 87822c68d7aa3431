#!/usr/bin/env bash
# make infra-check: prove the Bicep templates parse and pass checkov's security checks.
#
#   bash infra/check.sh [DIR]      (DIR defaults to infra/)
#
# 1. Creates or reuses the venv .venv-infra at the repo root (INFRA_VENV overrides) with the
#    tools pinned in infra/requirements-check.txt. checkov pins old shared libraries, so it is
#    kept apart from the app's .venv. Reinstalled when the requirements file changes.
# 2. Parses every .bicep under DIR with pycep-parser and every .bicepparam with a strict parser
#    of its own (pycep-parser has no grammar for parameter files); checks that every
#    checkov:skip comment names a check and carries a justification (infra/check_parse.py).
# 3. Runs `checkov --framework bicep` on DIR with the project's own checks (infra/checkov/)
#    and judges its JSON report (infra/check_report.py): parsing errors, failed checks,
#    unjustified or stale skips all fail; checkov alone exits 0 on files it cannot parse.
# 4. Runs the project rules that span resources and files (infra/checkov/connector_rules.py):
#    storage data roles scoped to single tables/queues/containers, diagnostic settings, private
#    endpoints and VNet integration behind privateNetworking, production parameter files.
# Exits non-zero on any problem.
set -uo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
TARGET="${1:-infra}"
VENV="${INFRA_VENV:-$REPO_ROOT/.venv-infra}"
REQS="$SCRIPT_DIR/requirements-check.txt"
PYTHON="${PYTHON:-python3}"
START=$SECONDS

if [ ! -d "$TARGET" ]; then
    echo "infra-check: no such directory: $TARGET" >&2
    exit 2
fi

bootstrap() {
    if [ -x "$VENV/bin/checkov" ] && cmp -s "$REQS" "$VENV/.infra-requirements.txt"; then
        return 0
    fi
    echo "infra-check: installing $(grep -v '^#' "$REQS" | xargs) into $VENV (first run only)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV" || return 1
    if ! "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQS" \
        >"$LOCK_DIR/infra-check-install.log" 2>&1; then
        grep -v '^WARNING: Location' "$LOCK_DIR/infra-check-install.log" | tail -n 20 >&2
        return 1
    fi
    cp "$REQS" "$VENV/.infra-requirements.txt"
}

# Serialise bootstraps of concurrent runs (parallel tests, make -j); lock outside the work tree.
LOCK_DIR="${TMPDIR:-/tmp}"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$LOCK_DIR/infra-check-$(printf '%s' "$VENV" | cksum | cut -d' ' -f1).lock"
    flock 9
fi
if ! bootstrap; then
    echo "infra-check: FAILED to set up $VENV" >&2
    exit 1
fi
if command -v flock >/dev/null 2>&1; then
    flock -u 9
fi

status=0
echo "== parse: $TARGET"
if ! "$VENV/bin/python" "$SCRIPT_DIR/check_parse.py" "$TARGET"; then
    status=1
fi

echo "== checkov --framework bicep: $TARGET"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
CKV_SKIP_PACKAGE_UPDATE_CHECK=true BC_SKIP_MAPPING=TRUE PYTHONDONTWRITEBYTECODE=1 \
    "$VENV/bin/checkov" --framework bicep -d "$TARGET" \
    --external-checks-dir "$SCRIPT_DIR/checkov" \
    --skip-download -o json >"$WORK/report.json" 2>"$WORK/stderr.txt"
ckv_rc=$?
if [ "$ckv_rc" -gt 1 ]; then
    echo "ERROR   checkov exited $ckv_rc:"
    tail -n 20 "$WORK/stderr.txt"
    status=1
fi
if ! "$VENV/bin/python" "$SCRIPT_DIR/check_report.py" "$WORK/report.json" "$TARGET"; then
    status=1
fi

echo "== project rules: $TARGET"
if ! PYTHONDONTWRITEBYTECODE=1 "$VENV/bin/python" "$SCRIPT_DIR/checkov/connector_rules.py" "$TARGET"; then
    status=1
fi

if [ "$status" -eq 0 ]; then
    echo "infra-check: OK ($TARGET, $((SECONDS - START)) s)"
else
    echo "infra-check: FAILED ($TARGET, $((SECONDS - START)) s)"
fi
exit "$status"
