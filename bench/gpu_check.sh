#!/usr/bin/env bash
# One GPU check, under 8 minutes on one H100/H200: the GPU-marked tests, bench/optimizer_step.py (every
# candidate, compiled ones included, with --sync-check) and bench/callback_overhead.py, each under a
# `timeout`, with every log and JSON in ONE folder: $OUT when set (the device tool's output folder), else
# bench/results/gpu-<date>/. A part that fails or times out does not stop the others; summary.txt
# records each part's exit code and time, and a short summary is printed at the end.
#
#   bash bench/gpu_check.sh                   # from the repository root, python3 = torch with CUDA
#
# Needs python3 with torch (CUDA), lightning, torchmetrics, tensorboard, transformers and pytest. A
# bitsandbytes wheel in .whl/ is installed with --no-deps; this package is installed with
# `pip install --no-deps -e .` unless python3 already imports this checkout (offline fallback: a
# symlinked copy of the package layout on PYTHONPATH). Files written (7, flat): summary.txt, setup.log,
# pytest.log, optimizer_step.log, optimizer_step.json, callback_overhead.log, callback_overhead.json.
#
# Environment knobs (defaults in brackets): PYTHON [python3]; GPU_CHECK_BUDGET_S, the whole run [450];
# PYTEST_S, the most the tests get [210]; BENCH_S / CALLBACK_S, the time kept for the step bench and the
# callback bench while earlier parts run [160 / 80] (time a part leaves unused passes to the later ones);
# BENCH_ARGS [--sync-check]; CALLBACK_ARGS [--steps 100 --warmup 20]. Worst case: budget + 10 s per part.
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-450}))
PYTEST_S=${PYTEST_S:-210}
BENCH_S=${BENCH_S:-160}
CALLBACK_S=${CALLBACK_S:-80}
BENCH_ARGS=${BENCH_ARGS:---sync-check}
CALLBACK_ARGS=${CALLBACK_ARGS:---steps 100 --warmup 20}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

if [ -n "${OUT:-}" ]; then
  R=$OUT
else
  R=bench/results/gpu-$(date +%Y-%m-%d)
  [ -e "$R" ] && R=$R-$(date +%H%M%S)
fi
mkdir -p "$R" || exit 2
R=$(cd "$R" && pwd)
SUMMARY=$R/summary.txt
STATUS=0

{
  echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)  repo $ROOT  commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1
} >"$SUMMARY"

# -- setup ------------------------------------------------------------------------------------------------
imports_this_checkout() {
  "$PY" -c "
import os, sys, lightning_optim, lightning_optim.callbacks, lightning_optim.monitors, lightning_optim.examples.gpt
sys.exit(0 if os.path.realpath(lightning_optim.__file__).startswith('$ROOT/') else 1)" >/dev/null 2>&1
}

{
  shopt -s nullglob
  wheels=(.whl/bitsandbytes-*.whl)
  if [ ${#wheels[@]} -gt 0 ]; then
    echo "+ pip install --no-deps ${wheels[*]}"
    timeout 60 "$PY" -m pip install -q --no-deps --no-index "${wheels[@]}"
  else
    echo "no .whl/bitsandbytes-*.whl: bitsandbytes rows are skipped unless it is installed"
  fi
  if imports_this_checkout; then
    echo "lightning_optim: this checkout is already importable"
  else
    echo "+ pip install --no-deps -e ."
    timeout 90 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
    if ! imports_this_checkout; then
      # offline fallback: the package layout of pyproject.toml as symlinks, first on PYTHONPATH
      SHIM=$(mktemp -d)/site
      mkdir -p "$SHIM/lightning_optim"
      ln -s "$ROOT"/lightning_optim/* "$SHIM/lightning_optim/"
      for sub in callbacks monitors examples; do ln -s "$ROOT/$sub" "$SHIM/lightning_optim/$sub"; done
      # PYTHONSAFEPATH (Python >= 3.11): no cwd on sys.path, so ./lightning_optim does not hide the shim
      export PYTHONPATH=$SHIM${PYTHONPATH:+:$PYTHONPATH} PYTHONSAFEPATH=1
      echo "pip install failed: using PYTHONPATH=$SHIM with PYTHONSAFEPATH=1"
      imports_this_checkout || echo "lightning_optim still not importable: the parts below will fail"
    fi
  fi
  "$PY" -c 'import lightning_optim as lo; print("lightning_optim", lo.__version__, lo.__file__)'
  "$PY" -c 'import bitsandbytes as b; print("bitsandbytes", b.__version__)' 2>&1 | tail -n 1
} >"$R/setup.log" 2>&1
echo "setup: $(tail -n 2 "$R/setup.log" | tr '\n' ' ')" >>"$SUMMARY"

# -- parts ------------------------------------------------------------------------------------------------
# run_part NAME CAP RESERVE_AFTER CMD...: runs CMD under `timeout` for at most CAP seconds and the time left
# before the deadline minus what the later parts keep (at least 20 s while time is left), output to
# $R/NAME.log; records the exit code and time in summary.txt.
run_part() {
  local name=$1 cap=$2 reserve=$3
  shift 3
  local now left limit rc t0
  now=$(date +%s)
  left=$((DEADLINE - now))
  limit=$((left - reserve))
  [ "$limit" -lt 20 ] && limit=20
  [ "$limit" -gt "$cap" ] && limit=$cap
  [ "$limit" -gt $((left - 5)) ] && limit=$((left - 5))
  if [ "$limit" -lt 5 ]; then
    printf '%-18s rc=%-4s %5ss  (no time left)\n' "$name" skip 0 >>"$SUMMARY"
    STATUS=1
    return
  fi
  echo "== $name (timeout ${limit}s): $*"
  t0=$(date +%s)
  # SIGINT first: pytest then still prints its summary, the bench has written its JSON row by row
  timeout --signal=INT --kill-after=10 "$limit" "$@" >"$R/$name.log" 2>&1
  rc=$?
  local note=ok
  [ "$rc" -ne 0 ] && note=FAILED && STATUS=1
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && note="TIMEOUT after ${limit}s"
  printf '%-18s rc=%-4s %5ss  %s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$note" | tee -a "$SUMMARY"
}

echo "results: $R"
run_part pytest "$PYTEST_S" $((BENCH_S + CALLBACK_S)) \
  "$PY" -m pytest -v -m gpu tests/ -p no:cacheprovider --continue-on-collection-errors -rfEs --durations=10 \
  -o faulthandler_timeout=100
# shellcheck disable=SC2086  # BENCH_ARGS / CALLBACK_ARGS are word lists on purpose
run_part optimizer_step 100000 "$CALLBACK_S" \
  "$PY" bench/optimizer_step.py --device cuda $BENCH_ARGS --out "$R/optimizer_step.json"
# shellcheck disable=SC2086
run_part callback_overhead 100000 0 \
  "$PY" bench/callback_overhead.py --device cuda $CALLBACK_ARGS --out "$R/callback_overhead.json"

# -- summary ----------------------------------------------------------------------------------------------
{
  echo
  echo "pytest: $(grep -E '(passed|failed|errors?|skipped|deselected|no tests ran)( |,|$)' "$R/pytest.log" | grep -E ' in [0-9.]+s|no tests ran' | tail -n 1)"
  grep -E '^(FAILED|ERROR) ' "$R/pytest.log" | head -n 20
  "$PY" - "$R/optimizer_step.json" <<'EOF' 2>&1
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as exc:
    sys.exit(f"optimizer_step: no JSON ({type(exc).__name__})")
state = "complete" if d.get("complete") else "INCOMPLETE (cut short)"
print(f"\noptimizer_step ({d['device']}, {d['set']}, {d['params']:,} params, {state}):")
print(f"{'name':<22}{'median ms':>10}{'x fused':>9}{'x foreach':>10}{'compile s':>10}  sync-free")
fmt = lambda v, s: "-" if v is None else format(v, s)
for r in d["results"]:
    sync = {True: "yes", False: "NO", None: "-"}[r.get("sync_free")]
    print(f"{r['name']:<22}{r['median_ms']:>10.3f}{fmt(r['ratio_fused'], '.2f'):>9}"
          f"{fmt(r['ratio_foreach'], '.2f'):>10}{fmt(r['compile_s'], '.1f'):>10}  {sync}")
for s in d["skipped"]:
    print(f"skipped {s['name']}: {s['reason'][:100]}")
EOF
  echo
  echo "callback_overhead:"
  "$PY" - "$R/callback_overhead.json" <<'EOF' 2>&1
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["results"]
except Exception as exc:
    sys.exit(f"  no JSON ({type(exc).__name__}); ms/step of finished configurations are in callback_overhead.log")
base = next(r["ms_per_step"] for r in rows if r["name"] == "none")
for r in rows:
    print(f"  {r['name']:<28}{r['ms_per_step']:>9.2f} ms/step {100 * (r['ms_per_step'] / base - 1):>+7.1f}%")
EOF
  echo
  echo "total $(($(date +%s) - START))s; files in $R"
} >>"$SUMMARY"

echo
cat "$SUMMARY"
exit "$STATUS"
