#!/bin/bash
# The Cannon at full size on the full profile's own training split, scored on results/full's held-out stars.
cd "$(git rev-parse --show-toplevel)"
S=./target/release/starflow
[ -f runs/full-split/model.safetensors ] || $S train --config configs/full.toml --epochs 1 --set data.calibration_n=0 --out runs/full-split > runs/lc/full-split.log 2>&1
$S rows --run runs/full-split --split train --out runs/lc/full-train-rows.txt
[ -f data/heldout-full-20261201-3000/spectra.npy ] || $S synth --n 3000 --seed 20261201 --out data/heldout-full-20261201-3000
/usr/bin/time -v "${CANNON_PYTHON:-python3}" crates/python/examples/cannon_baseline.py --data data/synth \
  --train-rows runs/lc/full-train-rows.txt --test data/heldout-full-20261201-3000 --out runs/lc/cannon-full > runs/lc/cannon-full.txt 2> runs/lc/cannon-full.err
echo "done full cannon $(date +%T)"
