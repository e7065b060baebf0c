#!/bin/bash
# The Cannon on each learning-curve run's training stars, scored on the same 3,000 test stars.
cd "$(git rev-parse --show-toplevel)"
for run in "$@"; do
  rows=runs/lc/$run.train_rows.txt
  ./target/release/starflow rows --run runs/lc/$run --split train --out $rows
  "${CANNON_PYTHON:-python3}" crates/python/examples/cannon_baseline.py --data data/lc-pool-7-25000 \
    --train-rows $rows --test data/lc-test-1001-3000 --out runs/lc/cannon-$run > runs/lc/cannon-$run.txt 2>runs/lc/cannon-$run.err
  echo "done cannon $run $(date +%T)"
done
