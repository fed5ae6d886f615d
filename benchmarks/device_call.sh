# Sourced by the device-call scripts (gpu_session.sh, experiments/*_one_call.sh): the repository
# root as working directory, $OUT for the logs, the carried wheels installed, a time budget of
# BUDGET_S seconds (default 570: a device call is cut at 600) that each step checks before it runs,
# and the steps the scripts share.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-gpu_out}
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
