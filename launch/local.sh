#!/usr/bin/env bash
# Start N processes of `python -m tam_jax.main` on this machine, joined by a loopback coordinator.
#
#   launch/local.sh N [main.py flags...]
#   e.g. XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
#        launch/local.sh 2 --config=configs/demo.py --workdir=runs/demo_2proc
#
# Each process gets --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I (PORT: $PORT,
# else a free one). With GPUS_PER_PROCESS=G, process I sees GPUs I*G .. I*G+G-1 only. If one process fails,
# the others are stopped and its exit status is returned; SIGTERM / Ctrl-C are passed on to all of them, so
# they save a checkpoint and exit.
set -uo pipefail
if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N [python -m tam_jax.main flags...]" >&2
  exit 2
fi
count=$1
shift
port=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
stop_all() {
  local signal=$1
  for pid in "${pids[@]}"; do kill "-$signal" "$pid" 2>/dev/null; done
}
trap 'stop_all TERM; wait; exit 143' TERM
trap 'stop_all INT; wait; exit 130' INT

for ((i = 0; i < count; i++)); do
  if [[ -n ${GPUS_PER_PROCESS:-} ]]; then
    export CUDA_VISIBLE_DEVICES=$(seq -s, $((i * GPUS_PER_PROCESS)) $((i * GPUS_PER_PROCESS + GPUS_PER_PROCESS - 1)))
  fi
  python3 -m tam_jax.main --coordinator_address="127.0.0.1:$port" --num_processes="$count" \
    --process_id="$i" "$@" &
  pids+=($!)
done

status=0
for ((i = 0; i < count; i++)); do
  wait -n
  code=$?
  if [[ $code -ne 0 && $status -eq 0 ]]; then
    status=$code
    echo "launch/local.sh: a process exited with status $code; stopping the others." >&2
    stop_all TERM
  fi
done
exit $status
