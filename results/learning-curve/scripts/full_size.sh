#!/bin/bash
# Issue 32 at full size (4 x 4,096 px): one backbone + flow trained with configs/full.toml on the full
# profile's 8,914 stars treated as real data (spectra.npy and labels.npy only, so the maps are fitted
# on the 2,228 validation stars: the real-data path of issue 29), then scored on 3,000 stars of seed
# 20261201 (The Cannon's test stars, ../../full/cannon/) and 10,000 stars of seed 20261207.
# Usage: full_size.sh BACKBONE FLOW EPOCHS NAME
set -e
cd "$(git rev-parse --show-toplevel)"
S=./target/release/starflow
if [ ! -f data/realish-full-42/spectra.npy ]; then
  $S synth --n 8914 --seed 42 --pixels-per-camera 4096 --out data/synth-full-42
  mkdir -p data/realish-full-42
  ln -f data/synth-full-42/spectra.npy data/synth-full-42/labels.npy data/realish-full-42/
fi
for s in 20261201-3000 20261207-10000; do
  d=data/heldout-full-$s
  [ -f $d/spectra.npy ] || $S synth --n ${s#*-} --seed ${s%-*} --pixels-per-camera 4096 --out $d
done
mkdir -p runs/full
out=runs/full/$4
/usr/bin/time -f "%e s wall" $S train --config configs/full.toml --backbone $1 --flow $2 \
  --set data.dir=data/realish-full-42 --set data.synthetic=false \
  --set optim.epochs=$3 --set optim.patience=$3 --out $out > $out.train.log 2>&1
for s in 20261201-3000 20261207-10000; do
  $S evaluate --run $out --data data/heldout-full-$s > $out.heldout-$s.txt 2>&1
done
echo "done $out $(date +%T)"
