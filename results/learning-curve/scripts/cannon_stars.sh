#!/bin/bash
# Issue 32: The Cannon on the same training stars as a full_size_stars.sh run, scored on the same
# 3,000 stars of seed 20261201. Usage: cannon_stars.sh N RUN   (e.g. 32400 n30072-e30)
# N names the data set full_size_stars.sh drew (data/realish-full-42-nN); RUN is the run under
# runs/full whose training split The Cannon fits. CANNON_PYTHON is a Python with numpy<2 and
# the-cannon 0.2.6 (crates/python/examples/cannon_baseline.py says how to make one). Memory grows
# with the training stars: 4.5 GB peak at 11,672.
set -e
cd "$(git rev-parse --show-toplevel)"
S=${STARFLOW:-./target/release/starflow}
mkdir -p runs/lc
rows=runs/full/$2-train-rows.txt
$S rows --run runs/full/$2 --split train --out $rows
/usr/bin/time -v "${CANNON_PYTHON:-python3}" crates/python/examples/cannon_baseline.py \
  --data data/realish-full-42-n$1 --train-rows $rows --test data/heldout-full-20261201-3000 \
  --out runs/lc/cannon-full-$2 > runs/lc/cannon-full-$2.txt 2> runs/lc/cannon-full-$2.err
echo "done cannon $2 $(date +%T)"
