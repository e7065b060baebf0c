#!/bin/bash
# Learning curve (issue 32), quick size: TinyCNN + diagonal_gaussian, N training stars from one
# 25,000-star pool (seed 7), validation 1,200 stars, scored on 3,000 stars of seed 1001.
set -e
cd "$(git rev-parse --show-toplevel)"
S=./target/release/starflow
POOL=data/lc-pool-7-25000
TEST=data/lc-test-1001-3000
[ -f $POOL/spectra.npy ] || $S synth --n 25000 --seed 7 --pixels-per-camera 1024 --out $POOL
[ -f $TEST/spectra.npy ] || $S synth --n 3000 --seed 1001 --pixels-per-camera 1024 --out $TEST
run() { # N EPOCHS BACKBONE
  local n=$1 e=$2 bb=$3
  local out=runs/lc/$bb-n$n-e$e
  local tf=$(python3 -c "print($n/25000)")
  local vf=0.048
  local sf=$(python3 -c "print(round(1-$n/25000-0.048, 10))")
  if [ ! -f $out/state.json ] || ! grep -q '"completed": *true' $out/state.json 2>/dev/null; then
    rm -rf $out
    /usr/bin/time -f "%e s wall" $S train --config configs/quick.toml --backbone $bb --flow diagonal_gaussian \
      --set data.dir=$POOL --set data.synthetic=false --set data.calibration_n=0 \
      --set data.train_fraction=$tf --set data.val_fraction=$vf --set data.test_fraction=$sf \
      --set optim.epochs=$e --set optim.patience=$e --out $out > $out.train.log 2>&1 || { echo "FAILED $out"; return; }
  fi
  $S evaluate --run $out --data $TEST > $out.eval.txt 2>&1
  echo "done $out $(date +%T)"
}
for spec in "$@"; do run $spec; done
