#!/bin/bash
# Issue 32, architecture screen at the quick grid: TinyCNN against `tiny_cnn_readout` (96 position
# templates per channel instead of 32), 5,400 training stars x 24 epochs, validation 1,200 stars,
# scored on 3,000 stars of tuning seed 1001. Usage: readout.sh BACKBONE SEED...
# THREADS=N trains with run.threads N (results are reproducible for a fixed thread count; 0, the
# default, takes every core).
set -e
cd "$(git rev-parse --show-toplevel)"
S=./target/release/starflow
POOL=data/lc-pool-7-6600
TEST=data/lc-test-1001-3000
[ -f $POOL/spectra.npy ] || $S synth --n 6600 --seed 7 --pixels-per-camera 1024 --out $POOL
[ -f $TEST/spectra.npy ] || $S synth --n 3000 --seed 1001 --pixels-per-camera 1024 --out $TEST
bb=$1; shift
for seed in "$@"; do
  out=runs/lc/$bb-n5400-e24-s$seed${THREADS:+-t$THREADS}
  if ! grep -q '"completed": *true' $out/state.json 2>/dev/null; then
    rm -rf $out
    /usr/bin/time -f "%e s wall" $S train --config configs/quick.toml --backbone $bb --flow diagonal_gaussian \
      --set data.dir=$POOL --set data.synthetic=false --set data.calibration_n=0 \
      --set data.train_fraction=0.8181818182 --set data.val_fraction=0.1818181819 --set data.test_fraction=0 \
      --set optim.epochs=24 --set optim.patience=24 --set run.seed=$seed --set run.threads=${THREADS:-0} --out $out > $out.train.log 2>&1 \
      || { echo "FAILED $out"; tail -5 $out.train.log; continue; }
  fi
  $S evaluate --run $out --data $TEST > $out.eval.txt 2>&1
  echo "done $out $(date +%T)"
done
