#!/usr/bin/env bash
# Run tam_jax on every worker of a Cloud TPU VM slice; JAX detects the slice and joins the workers.
#
#   launch/tpu_vm.sh TPU_NAME ZONE [main.py flags...]
#   e.g. launch/tpu_vm.sh my-v4-32 us-central2-b --config=configs/kinetics.py:shot=5 \
#            --workdir=gs://my-bucket/runs/kinetics_5shot --config.data.kind=tfds \
#            --config.data.tfds_name=kinetics100_fewshot --config.data.tfds_data_dir=gs://my-bucket/tfds
#
# Expects this checkout at ~/tam_jax on every worker, installed with `pip install -e ".[data,tools]"` and
# `pip install "jax[tpu]"`; the workdir must be visible to all workers (a GCS bucket).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 TPU_NAME ZONE [python -m tam_jax.main flags...]" >&2
  exit 2
fi
tpu=$1
zone=$2
shift 2
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all \
  --command "cd ~/tam_jax && python3 -m tam_jax.main --distributed=on $(printf '%q ' "$@")"
