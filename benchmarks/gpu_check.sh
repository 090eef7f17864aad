#!/usr/bin/env bash
# Every GPU check of this project, on a host with torch >= 2.11 and no package index, in two phases that follow
# the device tool's calls (../shared/device/README.md: p1 of .device-kit first, then the DALI parts one per call):
#
#   bash benchmarks/gpu_check.sh torch   # the call that carried .device-kit/p1: the torch-only and FFCV checks
#   bash benchmarks/gpu_check.sh dali    # the call that carried the last DALI part: the DALI checks
#
# torch: installs the kit (FFCV), writes a JPEG set and its .beton, runs the gpu-marked tests that need no DALI
#        (-m gpu -k "not dali"), the doctor for ResNet-50 at 224 px with FFCV to CUDA (and torchvision), and
#        benchmarks/train_step.py --yardstick (LeOCLR and MoCo-v2, ResNet-50, 224 px, batch 256).
# dali:  installs the DALI parts, runs the gpu-marked DALI tests (-m gpu -k dali) and the doctor with DALI
#        `mixed` (and FFCV, in the same run, when its .beton is there).
# A gpu-marked test that needs DALI has "dali" in its name or parameters; that is how the phases split them.
# Each step has its own timeout, and a phase stops starting steps at its deadline: torch 300 s, dali 240 s,
# 9 minutes together (one device call may run 10). Everything goes under $OUT (default ./gpu-check-out), at
# most 6 files per phase: gpu-check-PHASE.log (all output, the GPU's name first), summary-PHASE.json (each
# step's status, seconds, exit code), doctor-PHASE.json, pytest-PHASE.xml, train_step.json (torch).
# The JPEG set stays in $GPU_CHECK_WORK (default /tmp/gpu-check-work) for the next phase on the same host.
#
# --small: tiny sizes, for checking this script's plumbing on a CPU (tests/test_doctor.py does): the kit is
# not installed (it writes /tmp/kit), what needs CUDA says so and runs on the CPU or skips, and the timeouts
# are 3x (a shared 2-core CPU is slower at the tiny sizes than the GPU host at the real ones).
# PYTHON picks the interpreter (default python3, the one holding torch on the GPU host).
set -uo pipefail

phase=${1:-}
small=0
[ "${2:-}" = "--small" ] && small=1
case "$phase" in
  torch) phase_s=300 ;;
  dali) phase_s=240 ;;
  *) echo "usage: bash benchmarks/gpu_check.sh torch|dali [--small]"; exit 2 ;;
esac
slack=$((small ? 3 : 1))  # a shared 2-core CPU runs even the tiny sizes slower than the GPU host the real ones
phase_s=$((phase_s * slack))
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-./gpu-check-out}
WORK=${GPU_CHECK_WORK:-/tmp/gpu-check-work}
mkdir -p "$OUT" "$WORK"
log="$OUT/gpu-check-$phase.log"
steps="$OUT/.steps-$phase.tsv"
: > "$log"
: > "$steps"
started=$(date +%s)
deadline=$((started + phase_s))
failed=0

say() { echo "$*" | tee -a "$log"; }

step() {  # step NAME CAP_S COMMAND...: runs COMMAND with a timeout of CAP_S (less if the phase's deadline is near)
  local name=$1 cap=$(($2 * slack)); shift 2
  local left=$((deadline - $(date +%s) - 5))  # 5 s for the summary
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 10 ]; then
    say "=== $name: SKIPPED, the phase's $phase_s s are spent"
    printf '%s\tskipped\t-\t0\t0\tphase deadline\n' "$name" >> "$steps"
    return
  fi
  say "=== $name (timeout ${limit} s): $*"
  local t0 rc status
  t0=$(date +%s)
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    5) if [ "$name" = pytest ]; then status="no tests"; else status=failed; failed=1; fi ;;  # pytest: none selected
    124 | 137) status=timeout; failed=1 ;;
    *) status=failed; failed=1 ;;
  esac
  say "=== $name: $status (exit $rc, $(($(date +%s) - t0)) s)"
  printf '%s\t%s\t%s\t%s\t%s\t-\n' "$name" "$status" "$rc" "$(($(date +%s) - t0))" "$limit" >> "$steps"
}

note() {  # note NAME TEXT: a step not run, and why, in the log and the summary
  say "=== $1: SKIPPED, $2"
  printf '%s\tskipped\t-\t0\t0\t%s\n' "$1" "$2" >> "$steps"
}

# --- the machine
say "gpu_check.sh $phase$([ $small = 1 ] && echo ' --small') on ${HOSTNAME:-this host}, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
if command -v nvidia-smi > /dev/null; then
  gpu=$(nvidia-smi -L 2>&1 | head -n 8)
else
  gpu="no nvidia-smi here (no NVIDIA driver)"
fi
say "GPU: $gpu"
say "CPU: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
say "commit: $(git rev-parse --short HEAD 2> /dev/null || echo 'not a git checkout')"

# --- the kit: FFCV (p1) and, once every part arrived, DALI, installed into /tmp/kit
if [ $small = 1 ]; then
  note kit "--small: the kit writes /tmp/kit (GPU hosts); this Python's packages are used"
elif [ -f .device-kit/p1/install.sh ]; then
  cap=$([ "$phase" = dali ] && echo 90 || echo 30)
  step kit "$cap" env PYTHON="$PY" bash .device-kit/p1/install.sh
  # shellcheck disable=SC1091
  [ -f /tmp/kit/env ] && . /tmp/kit/env && say "PYTHONPATH=$PYTHONPATH"
else
  note kit "no .device-kit/p1 here (bash ../shared/device/prepare.sh builds it): this Python's packages are used"
fi

step versions 30 "$PY" - << 'PY'
import importlib
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available {torch.cuda.is_available()}", end="")
print(f": {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")
major, minor = (int(p) for p in torch.__version__.split(".")[:2])
if (major, minor) < (2, 11):
    print(f"torch {torch.__version__} is older than the 2.11 this script was written for")
for name in ("torchvision", "numba", "cv2", "ffcv", "nvidia.dali"):
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', '')}")
    except Exception as error:  # a missing or broken package: reported, not fatal
        print(f"{name}: does not import ({type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''})")
PY
cuda=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2> /dev/null || echo 0)
[ "$cuda" = 1 ] || say "NO CUDA here: the gpu-marked tests skip (pytest says why) and the doctor and train_step run on the CPU"

# --- data: a generated JPEG set (mate-backgrounds photographs if installed, else synthetic) and its .beton
if [ $small = 1 ]; then
  count=24; size=(--arch resnet18 --image-size 16 --batch-size 8 --amp off)
  tests=tests/test_gpu.py  # the gpu-marked tests (collecting every file takes longer than the rest)
else
  count=2048; size=(--arch resnet50 --image-size 224 --batch-size 256 --amp bf16)
  tests=tests
fi
photos="$WORK/photos-$count"
beton="$WORK/photos-$count-ffcv"
if [ -d "$photos/train" ] && [ -f "$photos/.complete" ]; then
  say "data: reusing $photos"
else
  rm -rf "$photos"
  step photos 30 "$PY" -m benchmarks.photos "$photos" --count "$count" --workers "$(nproc)"
  [ -d "$photos/train" ] && touch "$photos/.complete"
fi
if [ ! -f "$beton/train.beton" ] && "$PY" -c 'import ffcv' > /dev/null 2>&1; then
  step convert 30 "$PY" -m pipeline.convert "$photos" "$beton" --max-resolution 0
fi
[ -f "$beton/train.beton" ] || say "no .beton (FFCV does not import, or the conversion failed): FFCV is left out"

# --- the checks
workers=$(($(nproc) < 8 ? $(nproc) : 8))
pytest=("$PY" -m pytest -q -rs -p no:cacheprovider --continue-on-collection-errors -m gpu "$tests")
if [ "$phase" = torch ]; then
  step pytest 65 "${pytest[@]}" -k "not dali" --junitxml "$OUT/pytest-torch.xml"
  backends=(--backends torchvision)
  loader=torchvision
  if [ -f "$beton/train.beton" ]; then
    backends+=(--backends ffcv --ffcv-data "$beton"); loader=ffcv
  fi
  if [ $small = 1 ]; then
    doctor=(--tiny --budget-s 10 --no-sweep)
    bench=("${size[@]}" --steps 1 --warmup 0 --rounds 1 --workers 1)
  else
    doctor=(--budget-s 60)
    bench=("${size[@]}" --steps 10 --warmup 3 --rounds 1 --workers "$workers")
  fi
  step doctor 90 "$PY" -m benchmarks.doctor --data "$photos" "${backends[@]}" --loader "$loader" \
    --workers "$workers" "${size[@]}" "${doctor[@]}" --json "$OUT/doctor-torch.json"
  if "$PY" -m benchmarks.train_step --help 2> /dev/null | grep -q -- --yardstick; then
    yardstick=(--yardstick)
  else
    yardstick=()
    say "benchmarks/train_step.py has no --yardstick here (issue 20 not merged): run without it"
  fi
  data=$([ "$loader" = ffcv ] && echo "$beton" || echo "$photos")
  step train_step 55 "$PY" -m benchmarks.train_step "${yardstick[@]}" --loader "$loader" --data "$data" \
    --train-limit 0 "${bench[@]}" --json "$OUT/train_step.json"
else
  if ! "$PY" -c 'import nvidia.dali' > /dev/null 2>&1; then
    say "DALI does not import: carry every part of .device-kit (p1/dali.manifest lists them), then run this again"
  fi
  step pytest 50 "${pytest[@]}" -k dali --junitxml "$OUT/pytest-dali.xml"
  backends=(--backends dali)
  # FFCV beside DALI in the same run (timings compare within one run only); --small leaves it to the torch phase.
  [ -f "$beton/train.beton" ] && [ $small = 0 ] && backends+=(--backends ffcv --ffcv-data "$beton")
  if [ $small = 1 ]; then
    doctor=(--tiny --budget-s 10 --no-sweep)
  else
    doctor=(--budget-s 55)
  fi
  step doctor 70 "$PY" -m benchmarks.doctor --data "$photos" "${backends[@]}" --loader dali --workers "$workers" \
    "${size[@]}" "${doctor[@]}" --json "$OUT/doctor-dali.json"
fi

# --- summary: a table at the end of the output (the device tool returns the tail) and summary-PHASE.json
say ""
say "summary of $phase ($(($(date +%s) - started)) s of $phase_s; GPU: $(echo "$gpu" | head -n 1)):"
{ printf 'step\tstatus\texit\tseconds\ttimeout_s\tnote\n'; cat "$steps"; } | column -t -s $'\t' 2> /dev/null \
  | sed 's/^/  /' | tee -a "$log" || cat "$steps"
GPU="$gpu" PHASE="$phase" SMALL="$small" STARTED="$started" "$PY" - "$steps" "$OUT/summary-$phase.json" << 'PY'
import json, os, sys, time
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
steps = [{"step": n, "status": s, "exit": r, "seconds": int(t), "timeout_s": int(c), "note": w} for n, s, r, t, c, w in rows]
summary = {"phase": os.environ["PHASE"], "small": os.environ["SMALL"] == "1", "gpu": os.environ["GPU"],
           "seconds": round(time.time() - int(os.environ["STARTED"])), "steps": steps}
open(sys.argv[2], "w").write(json.dumps(summary, indent=1) + "\n")
PY
rm -f "$steps"
exit $failed
