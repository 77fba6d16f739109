#!/usr/bin/env bash
# Ship the knee-region model as the bundled default, once the five-seed held-out grid is done and
# research/DEFAULT_CHOICE.md's rule (2026-12-07 03:05) passes. Run from the repository root:
#
#   scripts/ship_knee_default.sh GRID DATA [WORK]
#
# GRID: the finished `kneeosteo reproduce DATA --protocol holdout-reference --reference
# DATA/tscores.csv --models configs/levers/knee384.toml,configs/default_model.toml --seeds 5
# --covariates ...` folder; DATA: the KOP folder the grid was trained on; WORK: scratch folder for
# the calibrated run, the audit and the domain figures (default runs/ship_knee).
#
# What it does, in order (each step's time is printed):
#   0. the rule: knee384's mean AUC over the grid's seeds above the default settings row's, the
#      DeLong lower bound of the AUC of its seed-mean probability above 0.5, every seed in; it stops
#      here when the rule fails (scripts/bundle_default_model.py --check-rule);
#   1. kneeosteo calibrate on the seed-0 cell's own validation films (domain check and orientation
#      check on its training films, domain acceptance $ACCEPTANCE, 0.99 by research/DEFAULT_CHOICE.md
#      of 2026-12-07 05:40) -> WORK/default (weights copied byte for byte); history.csv copied in;
#   2. kneeosteo evaluate WORK/default: its held-out test films against their T-score truth, with
#      the shortcut probes and the trust block;
#   3. kneeosteo audit DATA (the metadata-only shortcut figure of the card), unless AUDIT is given;
#   4. research/knee_domain.py: the domain check's acceptance of the reference films, two-knee films
#      and the non-knee corpus;
#   5. scripts/bundle_default_model.py: the run into kneeosteo/assets/default_model (or $DEST) with
#      its card, the grid as evidence;
#   6. scripts/write_default_config.py: configs/default_model.toml becomes the bundled run's
#      settings (or $CONFIG_OUT).
#
# Environment: ACCEPTANCE (the domain check's, default 0.99), ROW (default knee384), AGAINST (default default_model: the grid row of the previous
# default's settings), REF (default DATA/tscores.csv), AUDIT (an audit.json to reuse), DEST,
# CONFIG_OUT, DEVICE (cpu), SKIP_RULE=1 (a trial only, never a ship: the rule is printed, not
# enforced; the grid folder still needs table1.json and clinical.json, e.g. a copy of the finished
# cells aggregated by `reproduce` with only their seeds; the card says how many seeds were in).
#
# Times on the shared 2-core machine (load ~16) on 2026-12-07, knee384 seed 0: rule check 95 s,
# calibrate 320 s, evaluate 1004 s (the probes included), knee_domain 7-14 min, bundle 10 s, config
# a few s; the audit was not timed (AUDIT=an existing audit.json of the same data skips it).
set -euo pipefail

GRID=${1:?usage: scripts/ship_knee_default.sh GRID DATA [WORK]}
DATA=${2:?usage: scripts/ship_knee_default.sh GRID DATA [WORK]}
WORK=${3:-runs/ship_knee}
ROW=${ROW:-knee384}
AGAINST=${AGAINST:-default_model}
REF=${REF:-$DATA/tscores.csv}
DEVICE=${DEVICE:-cpu}
ACCEPTANCE=${ACCEPTANCE:-0.99}
PY=${PY:-.venv/bin/python}
KO=${KO:-.venv/bin/kneeosteo}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
CELL=$GRID/cells/$ROW/seed0
RUN=$WORK/default

step() { echo "== $(date -u +%H:%M:%S) $*"; }
timed() { local t0=$SECONDS; "$@"; echo "   ($((SECONDS - t0)) s)"; }

[ -f "$CELL/metrics.json" ] || { echo "$CELL has no metrics.json: the seed-0 cell is not finished" >&2; exit 1; }
[ -e "$WORK" ] && { echo "$WORK exists: give a new WORK folder (nothing is overwritten)" >&2; exit 1; }
mkdir -p "$WORK"

step "0. the rule ($ROW against $AGAINST)"
if [ "${SKIP_RULE:-0}" = 1 ]; then
  echo "   SKIP_RULE=1: a trial, the rule is not checked"
  $PY scripts/bundle_default_model.py --check-rule --grid "$GRID" --row "$ROW" --against "$AGAINST" || true
else
  [ -f "$GRID/table1.json" ] && [ -f "$GRID/clinical.json" ] || { echo "$GRID: no table1.json/clinical.json: the grid is not finished" >&2; exit 1; }
  $PY scripts/bundle_default_model.py --check-rule --grid "$GRID" --row "$ROW" --against "$AGAINST" \
    || { echo "the rule fails: the bundled default stays (research/DEFAULT_CHOICE.md, rule 2)" >&2; exit 1; }
fi

step "1. calibrate $CELL on its own split"
timed $KO calibrate "$CELL" "$DATA" --split "$CELL/split.json" --out "$RUN" --device "$DEVICE" --domain-acceptance "$ACCEPTANCE"
cp "$CELL/history.csv" "$RUN/"

step "2. evaluate $RUN"
timed $KO evaluate "$RUN" --device "$DEVICE"

if [ -n "${AUDIT:-}" ]; then
  step "3. audit: reusing $AUDIT"
else
  step "3. audit $DATA"
  timed $KO audit "$DATA" --out "$WORK/audit"
  AUDIT=$WORK/audit/audit.json
fi

step "4. the domain check on the reference, two-knee and non-knee films"
timed $PY research/knee_domain.py "$DATA" --run "$RUN" --reference "$REF" --out "$WORK/knee_domain.json"

step "5. bundle"
timed $PY scripts/bundle_default_model.py "$RUN" "$AUDIT" --grid "$GRID" --row "$ROW" --against "$AGAINST" \
  --reference "$REF" --domain "$WORK/knee_domain.json" ${DEST:+--dest "$DEST"}

step "6. configs/default_model.toml"
timed $PY scripts/write_default_config.py "$RUN" "configs/levers/$ROW.toml" ${CONFIG_OUT:+"$CONFIG_OUT"}

step "done: review the card and the config, run the bundled-model tests, then commit"
