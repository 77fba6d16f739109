#!/usr/bin/env bash
# Lint and type check, as configured in pyproject.toml: ruff's rules (E, W, F, I, B, UP at 120
# columns), ruff's formatter (check only) and mypy. .ci/run runs this before `make test`, so any
# finding fails CI. Every check runs even when an earlier one fails; the exit status is 1 if any did.
#
#   scripts/lint.sh          check only (what CI does)
#   scripts/lint.sh --fix    first apply ruff's safe fixes and its formatter (the mechanical pass),
#                            then check; what is left needs a person
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${KNEEOSTEO_LINT_BIN:-.venv/bin}

if [ "${1:-}" = "--fix" ]; then
  "$BIN/ruff" check --fix --quiet . || true  # what is left is reported below
  "$BIN/ruff" format --quiet .
fi

status=0
echo "== ruff check" && { "$BIN/ruff" check . || status=1; }
echo "== ruff format --check" && { "$BIN/ruff" format --check . || status=1; }
echo "== mypy" && { "$BIN/mypy" || status=1; }
[ "$status" = 0 ] && echo "lint: clean" || echo "lint: findings above" >&2
exit "$status"
