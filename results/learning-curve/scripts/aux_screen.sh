#!/bin/bash
# Issue 32, route 2 at the quick grid: TinyCNN + diagonal Gaussian trained with each star's drawn
# abundance offsets (21 species) and microturbulence offset as auxiliary targets of weight W
# (data.aux_file, model.aux_outputs, optim.aux_weight), otherwise readout.sh's screen: 5,400 stars
# of data/lc-pool-7-6600 x 24 epochs, 1 thread, scored on 3,000 stars of tuning seed 1001.
# Usage: aux_screen.sh WEIGHT SEED      (needs numpy: /tmp/cannon/bin/python or PYTHON)
set -e
cd "$(git rev-parse --show-toplevel)"
S=./target/release/starflow
PY=${PYTHON:-/tmp/cannon/bin/python}
POOL=data/lc-pool-7-6600
AUX=$POOL-aux
TEST=data/lc-test-1001-3000
[ -f $POOL/spectra.npy ] || $S synth --n 6600 --seed 7 --pixels-per-camera 1024 --out $POOL
[ -f $TEST/spectra.npy ] || $S synth --n 3000 --seed 1001 --pixels-per-camera 1024 --out $TEST
if [ ! -f $AUX/abundances.npy ]; then
  mkdir -p $AUX
  ln -f $POOL/spectra.npy $POOL/labels.npy $AUX/
  cargo run --release -q -p starflow-data --example nuisances -- 7 6600 1024 > $AUX/nuisances.csv
  $PY - $AUX <<'PY'
import sys
import numpy as np
d = sys.argv[1]
nu = np.genfromtxt(f"{d}/nuisances.csv", delimiter=",", names=True)
labels = np.load(f"{d}/labels.npy")
assert np.allclose(nu["log_g"], labels[:, 5], atol=1e-5), "nuisances of another set"
cols = [f"x_fe{s}" for s in range(21)] + ["d_xi"]
np.save(f"{d}/abundances.npy", np.column_stack([nu[c] for c in cols]).astype(np.float32))
PY
fi
w=$1; seed=$2
out=runs/lc/tiny_cnn-aux22-w$w-n5400-e24-s$seed-t1
rm -rf $out
/usr/bin/time -f "%e s wall" $S -v train --config configs/quick.toml --backbone tiny_cnn --flow diagonal_gaussian \
  --set data.dir=$AUX --set data.synthetic=false --set data.calibration_n=0 \
  --set data.aux_file='"abundances.npy"' --set model.aux_outputs=22 --set optim.aux_weight=$w \
  --set data.train_fraction=0.8181818182 --set data.val_fraction=0.1818181819 --set data.test_fraction=0 \
  --set optim.epochs=24 --set optim.patience=24 --set run.seed=$seed --set run.threads=1 --out $out > $out.train.log 2>&1
$S evaluate --run $out --data $TEST > $out.eval.txt 2>&1
echo "done $out $(date +%T)"
