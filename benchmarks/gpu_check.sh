#!/usr/bin/env bash
# The GPU path end to end on one NVIDIA GPU (issue 18); see benchmarks/gpu_check.py for the steps and options.
#   benchmarks/gpu_check.sh --dry-run     # the plan, no GPU needed
#   benchmarks/gpu_check.sh               # report in reports/gpu_check/report.{json,md}
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
if [[ ! -x "$python" ]]; then
  python="$(command -v python3)"
fi
exec "$python" "$root/benchmarks/gpu_check.py" "$@"
