# Sourced by the device-call scripts (gpu_session.sh, experiments/*_one_call.sh): the repository
# root as working directory, $OUT for the logs, the carried wheels installed, a time budget of
# BUDGET_S seconds (default 570: a device call is cut at 600) that each step checks before it runs,
# and the steps the scripts share.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=$(realpath -m "${OUT:-gpu_out}") # absolute: steps may run in another tree (.snap/base)
mkdir -p "$OUT"
start=$(date +%s)
left() { echo $((${BUDGET_S:-570} - ($(date +%s) - start))); }
step() { # step NAME ESTIMATE_S: true if it fits the time left
  if [ "$(left)" -lt "$2" ]; then echo "== $1 skipped: $(left) s left, needs ~$2"; return 1; fi
  echo "== $1 ($(left) s left)"
}
# Wheels in .whl/ (Liger, expecttest): nothing downloads on the device machine.
if compgen -G ".whl/*.whl" >/dev/null; then python3 -m pip install -q --no-deps .whl/*.whl; fi

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader

build_in_place() { # build_in_place NAME ESTIMATE_S: the extension built in this tree; exits if not
  step "build $1" "$2" && python3 benchmarks/ab_kernels.py --build --rounds 0 "$1=." >>"$OUT/build.log" 2>&1 ||
    { tail -20 "$OUT/build.log"; exit 1; }
  grep "^built" "$OUT/build.log" | tail -1
}

ab() { # ab NAME ESTIMATE_S RESERVE_S ab_kernels.py-arguments...: RESERVE_S left for what follows
  local name=$1 estimate=$2 reserve=$3
  shift 3
  step "$name" "$estimate" || return 0
  # ab_kernels.py writes its table after every run: a run cut short still reports.
  timeout $(($(left) - reserve)) python3 benchmarks/ab_kernels.py --out "$OUT/$name" "$@" \
    >"$OUT/$name.log" 2>&1
  cat "$OUT/$name/ab.md" 2>/dev/null
}

memcheck() { # memcheck NAME ESTIMATE_S "K1;K2;...": compute-sanitizer memcheck of this tree's kernel tests,
  # one process per pytest -k expression (so memory one group holds cannot fail another) -> NAME.log
  # (NAME_2.log, ...), and each test's CUDA memory (cuda_memory_report.py) -> NAME_memory.log
  local name=$1 estimate=$2 groups k i=0 log
  IFS=';' read -ra groups <<<"$3"
  for k in "${groups[@]}"; do
    i=$((i + 1))
    log=$name$([ $i -gt 1 ] && echo "_$i")
    step "$log ($k)" "$estimate" || return 0
    NORMPASS_NO_PROFILER=1 CUDA_MEMORY_LOG="$OUT/${name}_memory.log" PYTHONPATH=benchmarks \
      timeout $(($(left) - 5)) compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m pytest -q \
      -p no:cacheprovider -p cuda_memory_report tests/test_cuda_kernels.py -k "$k" >"$OUT/$log.log" 2>&1
    grep -E "ERROR SUMMARY|passed|failed" "$OUT/$log.log" | tail -3
  done
}
