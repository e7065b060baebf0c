#!/bin/bash
# Issue 29, real-data path: the widening for small calibration sets with one hinge per covariate
# (noise level and the three posterior means) against the noise hinge alone. TinyCNN's three flows
# trained as `cargo xtask train-all --data data/realish-31337 --backbones tiny_cnn` does (quick
# profile, maps on the 1,200 validation stars), then each run's maps refitted both ways and scored on
# 10,000 stars of tuning seed 1001. XX_NOISE_ONLY was a switch in the experiment's build only.
set -e
cd "$(git rev-parse --show-toplevel)"
S=${STARFLOW:-./target/release/starflow}
if [ ! -f data/realish-31337/spectra.npy ]; then
  $S synth --n 6000 --seed 31337 --pixels-per-camera 1024 --out data/realish-31337
  rm -f data/realish-31337/{crlb.npy,crlb_marginal.npy,synth.json,wavelength.npy}
fi
[ -f data/tune-1001/spectra.npy ] || $S synth --n 10000 --seed 1001 --pixels-per-camera 1024 --out data/tune-1001
mkdir -p runs/realish-hinges
out=results/quick-realish-31337/tune-1001-hinges
for flow in diagonal_gaussian full_gaussian full_flow; do
  r=runs/realish-hinges/tiny_cnn-$flow
  extra=""
  [ $flow = full_flow ] && extra="--set optim.epochs=12 --set optim.patience=12"
  [ -f $r/state.json ] && grep -q '"finished": *true' $r/state.json || \
    $S train --config configs/quick.toml --backbone tiny_cnn --flow $flow \
      --set data.dir=data/realish-31337 --set data.synthetic=false $extra --out $r > $r.train.log 2>&1
  for v in noise means; do
    rm -rf $r-$v && cp -r $r $r-$v && rm -f $r-$v/calibration.json
    if [ $v = noise ]; then export XX_NOISE_ONLY=1; else unset XX_NOISE_ONLY; fi
    $S evaluate --run $r-$v --data data/tune-1001 > $out/tiny_cnn-$flow.$v.txt 2>&1
    unset XX_NOISE_ONLY
  done
  echo "done $flow $(date +%T)"
done
