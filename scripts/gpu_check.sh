#!/usr/bin/env bash
# The GPU check, as one command: install the carried wheels (.whl/, see scripts/gpu_wheels.sh), probe the
# machine, run the CUDA tests and the doctr / RF-DETR benchmarks on CUDA, and write ONE results file, gpu_check.md
# (markdown tables, then the whole result as JSON), into $OUT, or into the folder given as argument when $OUT is unset.
# Each stage runs under its own `timeout`, clipped to what is left of a 280 s budget, and a failed or stuck stage is
# recorded and the next one runs: the whole check ends in under 5 minutes.
#
#   bash scripts/gpu_check.sh                         on the CUDA machine (with .whl/ copied, $OUT set)
#   bash scripts/gpu_check.sh --cpu-dry-run DIR       here: every stage on the CPU at the tiniest sizes (plumbing)
#   options: --install / --no-install (default: install on CUDA runs only), --only STAGE[,STAGE]
#   environment: PYTHON (default .venv/bin/python if present, else python3), GPU_CHECK_SITE (default /tmp/site),
#                GPU_CHECK_BUDGET (seconds, default 280; dry run 600), GPU_CHECK_LIMIT_<STAGE> (a stage's own limit,
#                seconds; in a dry run the CUDA limits times 3: a shared 2-core CPU is far slower than the GPU)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
MODE=cuda INSTALL=auto ONLY="" DEST=""
while [ $# -gt 0 ]; do
  case $1 in
    --cpu-dry-run) MODE=cpu-dry-run ;;
    --install) INSTALL=1 ;;
    --no-install) INSTALL=0 ;;
    --only) shift; ONLY=",${1:-},";;
    -h|--help) awk 'NR > 1 && /^#/ {print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
    *) DEST=$1 ;;
  esac
  shift
done
DEST=${OUT:-$DEST}
[ -n "$DEST" ] || { echo "gpu_check: no results folder: set OUT or give one as argument" >&2; exit 2; }
mkdir -p "$DEST" || exit 2
RESULT="$DEST/gpu_check.md"
[ "$INSTALL" = auto ] && { [ $MODE = cuda ] && INSTALL=1 || INSTALL=0; }
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
SITE=${GPU_CHECK_SITE:-/tmp/site}
if [ $MODE = cuda ]; then SCALE=1; else SCALE=3; fi
BUDGET=${GPU_CHECK_BUDGET:-$(( SCALE == 1 ? 280 : 600 ))}
START=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 MPLBACKEND=Agg
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
[ $INSTALL = 1 ] && export PYTHONPATH="$SITE:$PYTHONPATH"  # carried wheels first: they pin what the image differs in

# stage NAME LIMIT CMD...: run CMD under `timeout`, clipped to the budget left; record rc, seconds, log, command
stage() {
  local name=$1 limit=$2; shift 2
  local var="GPU_CHECK_LIMIT_${name^^}"
  limit=${!var:-$(( limit * SCALE ))}
  printf '%q ' "$@" > "$WORK/$name.cmd"
  if [ -n "$ONLY" ] && [[ $ONLY != *",$name,"* ]]; then echo "not selected (--only)" > "$WORK/$name.skip"; return; fi
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ $left -lt 5 ]; then
    echo "skipped: the ${BUDGET} s budget was spent" > "$WORK/$name.skip"
    echo "[gpu_check] $name: skipped (budget spent)"; return
  fi
  [ $left -lt $limit ] && limit=$left
  echo "[gpu_check] $name (limit ${limit} s): $*"
  local t0 rc
  t0=$(date +%s.%N)
  timeout -k 5 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  echo $rc > "$WORK/$name.rc"; echo "$limit" > "$WORK/$name.limit"
  echo "$(date +%s.%N) $t0" | awk '{printf "%.1f\n", $1 - $2}' > "$WORK/$name.seconds"
  echo "[gpu_check] $name: rc=$rc ($(cat "$WORK/$name.seconds") s)"
  tail -n 4 "$WORK/$name.log" | cut -c1-300
}

if [ $MODE = cuda ]; then
  DOCTR=(--device cuda --amp --arch vitstr_small --batch-size 64 --rounds 12 --steps 4 --check-steps 3)
  DETR=(--device cuda --resolution 384 --images 4 --batch 2 --rounds 5)
  CUDA_PATH_TESTS=(tests/patches/doctr/test_doctr.py -k bitwise)  # the reference loops send images to CUDA when it is present
else  # tiniest sizes: the plumbing, not a measurement
  DOCTR=(--device cpu --amp --arch tiny --batch-size 2 --rounds 1 --steps 1 --check-steps 2)
  DETR=(--device cpu --resolution 64 --images 2 --batch 2 --rounds 1)
  CUDA_PATH_TESTS=(tests/patches/doctr/test_doctr.py -k "bitwise and timm and fp32 and single")
fi
PYTEST=("$PYTHON" -m pytest -q --timeout 120)

if [ $INSTALL = 1 ]; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    stage install 40 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl
  else
    echo "failed: no .whl/*.whl here (run scripts/gpu_wheels.sh and carry .whl)" > "$WORK/install.skip"
  fi
else
  echo "not run: --no-install or a CPU dry run (the environment's own packages are used)" > "$WORK/install.skip"
fi
stage env 45 "$PYTHON" scripts/gpu_results.py env "$WORK/env.json"
# the tests that skip without CUDA: test_cuda.py whole, and the test_cuda_* tests of test_accelerator.py and
# test_profile.py
stage tests_cuda 50 "${PYTEST[@]}" --junitxml="$WORK/tests_cuda.xml" tests/detect/test_cuda.py \
  tests/detect/test_accelerator.py tests/detect/test_profile.py -k test_cuda
stage doctr 70 "$PYTHON" benchmarks/doctr_step.py "${DOCTR[@]}" --json "$WORK/doctr.json"
stage detr 70 "$PYTHON" benchmarks/detr_eval.py "${DETR[@]}" --json "$WORK/detr.json"
stage tests_cuda_path 35 "${PYTEST[@]}" --junitxml="$WORK/tests_cuda_path.xml" "${CUDA_PATH_TESTS[@]}"

# the writer is standard library only; if even it fails, the logs go into the results file as they are
if ! timeout -k 5 20 "$PYTHON" scripts/gpu_results.py write "$WORK" "$RESULT" --mode $MODE; then
  { echo "# shims GPU check: the results writer failed; raw stage records follow"
    for f in "$WORK"/*; do echo "## $(basename "$f")"; echo '```'; tail -c 3000 "$f"; echo '```'; done
  } > "$RESULT"
fi
echo "[gpu_check] results: $RESULT ($(( $(date +%s) - START )) s in all)"
rm -rf "$WORK"
