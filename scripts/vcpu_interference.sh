#!/bin/bash
# How much a busy CPU slows a pure-Python loop pinned to CPU 0: alone, beside the same loop on
# each other CPU in turn, then beside loops on CPUs FROM-TO (default: the second half of the
# machine, an emulated node 1). On a VM, CPUs that share a physical core show up here.
#     bash scripts/vcpu_interference.sh [FROM TO]
set -e
n=$(nproc)
from=${1:-$((n / 2))}; to=${2:-$((n - 1))}
spin='import sys, time
end = time.perf_counter() + float(sys.argv[1]); n = 0
while time.perf_counter() < end:
    for _ in range(1000): n += 1
print(n)'
alone=$(taskset -c 0 python3 -c "$spin" 0.5)
echo "cpu0 alone: $alone loops"
ratio() { python3 -c "print(f'{$1 / $alone:.2f}')"; }
for k in $(seq 1 $((n - 1))); do
  taskset -c "$k" python3 -c "$spin" 0.8 > /dev/null & busy=$!
  sleep 0.1
  v=$(taskset -c 0 python3 -c "$spin" 0.5)
  wait $busy
  echo "cpu0 beside cpu$k: $(ratio "$v") of alone"
done
pids=()
for k in $(seq "$from" "$to"); do taskset -c "$k" python3 -c "$spin" 1.5 > /dev/null & pids+=($!); done
sleep 0.2
v=$(taskset -c 0 python3 -c "$spin" 0.5)
wait "${pids[@]}"
echo "cpu0 beside cpus $from-$to: $(ratio "$v") of alone"
