#!/usr/bin/env bash
# The experiment behind configs/demo.py's optimiser, learning rate and temperature: short demo runs,
# compared by validation accuracy (TAM, 5-way 1-shot, 200 episodes) after 150 steps.
#   bash benchmarks/demo_sweep.sh [OUT_DIR]   -> OUT_DIR/summary.txt
set -euo pipefail
out=${1:-runs/demo_sweep}
mkdir -p "$out"
run() {  # name, then config overrides
  local name=$1; shift
  python -m tam_jax.main --config=configs/demo.py --mode=train --workdir="$out/$name" \
    --config.train.num_steps=150 --config.train.val_every_steps=150 "$@" > "$out/$name.log" 2>&1
  echo "$name $* -> $(grep val_accuracy "$out/$name/train_log.jsonl" | tail -1)" | tee -a "$out/summary.txt"
}
run paper_sgd_lr1e-3_t1 --config.train.optimizer=sgd --config.train.learning_rate=0.001 --config.fewshot.temperature=1.0
run sgd_lr0.05_t0.1 --config.train.optimizer=sgd --config.train.learning_rate=0.05 --config.fewshot.temperature=0.1
run adam_lr1e-3_t1 --config.train.optimizer=adam --config.train.learning_rate=0.001 --config.fewshot.temperature=1.0
run adam_lr1e-3_t0.1 --config.train.optimizer=adam --config.train.learning_rate=0.001 --config.fewshot.temperature=0.1
