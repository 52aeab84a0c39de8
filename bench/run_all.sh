#!/usr/bin/env bash
# Run every benchmark at the sizes BENCHMARKS.md reports and write bench/results/*.json and *.log.
# Usage, from the repository root: bash bench/run_all.sh [python]
# Extra settings can come from the environment, e.g. OMP_NUM_THREADS=1 for one torch thread.
set -euo pipefail

PYTHON="${1:-.venv/bin/python}"
RESULTS=bench/results
mkdir -p "$RESULTS"
export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1

# run OUTPUT MODULE [OPTIONS...]: python -m bench.MODULE OPTIONS, writing $RESULTS/OUTPUT.json and .log.
run() {
    local output=$1 module=$2
    shift 2
    echo "$(date -u +%FT%TZ) start $output (load: $(cut -d' ' -f1-3 /proc/loadavg))"
    "$PYTHON" -m "bench.$module" "$@" --out "$RESULTS/$output.json" >"$RESULTS/$output.log" 2>&1
    echo "$(date -u +%FT%TZ) done  $output (load: $(cut -d' ' -f1-3 /proc/loadavg))"
}

run train_step train_step --reps 20 --compile
# Two threads: what the stages use on a 2-core machine (runtime.threads: 0).
OMP_NUM_THREADS=2 run train_step_2_threads train_step --reps 20 --compile
run generation generation --prompts 8 --reps 3 --compile
OMP_NUM_THREADS=2 run generation_2_threads generation --prompts 8 --reps 3 --compile
run lora_forward lora_forward
run cpu_efficiency cpu_efficiency --reps 5
run scaling scaling
run pipeline_overhead pipeline_overhead --stage-server both
run pipeline_overhead_small_prefect pipeline_overhead --small --runner prefect --stage-server both
run pipeline_overhead_small_dvc pipeline_overhead --small --runner dvc
