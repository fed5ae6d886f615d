# Sourced by the device-call scripts (gpu_session.sh, experiments/ab_one_call.sh): the repository
# root as working directory, $OUT for the logs, the carried wheels installed, and a time budget of
# BUDGET_S seconds (default 570: a device call is cut at 600) that each step checks before it runs.
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
