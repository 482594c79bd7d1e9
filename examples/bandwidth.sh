#!/usr/bin/env bash
# A bandwidth check with `meshrun bench`: all_reduce bus bandwidth across a sweep of message sizes, the
# nccl-tests table printed, then the peak busbw compared with what the interconnect should reach.
# On GPUs it measures NCCL between them; on a machine without GPUs, gloo between 2 CPU ranks.
#
#     bash examples/bandwidth.sh                                                 # this machine
#     MIN_BUSBW=150 bash examples/bandwidth.sh --backend slurm --nodes 2 --gpus-per-node 8 -e 8G
#
# Extra arguments go to `meshrun bench` (see `meshrun bench --help` and docs/bench.md); MIN_BUSBW (GB/s,
# default 0: only report) makes the script exit 1 when the peak is lower, e.g. after a node swap or a
# driver update. `--pairwise` then finds the slow link. The files land in $OUT (default a fresh temp folder).
set -euo pipefail
out="${OUT:-$(mktemp -d)}"
meshrun bench -q -c all_reduce --no-plot -o "$out" "$@"
python3 - "$out/bench.jsonl" "${MIN_BUSBW:-0}" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
best = max((r for r in rows if r.get("record") == "result" and r.get("busbw") is not None), key=lambda r: r["busbw"])
minimum = float(sys.argv[2])
print(f"peak all_reduce busbw {best['busbw']:.3g} GB/s at {best['size']} B ({best['mode']}) on "
      f"{best['ranks']} ranks; expected at least {minimum:g} GB/s")
sys.exit(0 if best["busbw"] >= minimum else 1)
PY
