#!/usr/bin/env bash
# Issue 3: the demo's wall time, peak memory and held-out metrics on this machine.
# Usage: bash benchmarks/demo.sh OUTDIR [extra `medtriad demo` options, e.g. --quick]
#   e.g. bash benchmarks/demo.sh /tmp/demo-bench
set -euo pipefail
out=${1:?usage: $0 OUTDIR [medtriad demo options]}
shift
rm -rf "$out"
/usr/bin/time -v medtriad demo --out "$out" -q "$@" 2> "$out.time"
grep -E "Elapsed \(wall clock\)|Maximum resident set size" "$out.time"
python - "$out" <<'PY'
import json, sys
from pathlib import Path
from medtriad.evaluation.evaluate import headline_metrics
run = Path(sys.argv[1]) / "run"
history = json.loads((run / "history.json").read_text())
summary = json.loads((run / "evaluation_val" / "summary.json").read_text())
print(f"training steps {history[-1]['step']} in {history[-1]['elapsed_s'] / 60:.1f} min")
print(" ".join(f"{k}={v:.3f}" for k, v in headline_metrics(summary).items()))
PY
