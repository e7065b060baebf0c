#!/bin/bash
# Issue 32 / 29 at full size: the deep ensemble of two TinyCNN + full_flow runs trained by
# full_size_stars.sh on the same 11,672 stars (run.seed 42 and 43), against each member alone.
# Scored on The Cannon's 3,000 stars of seed 20261201 (RMSE) and per kind of star on 10,000 stars
# of seed 20261209 (used for no choice), the members' and the mixture's maps fitted on the 2,228
# validation stars alone (the real-data path). Usage: ensemble_stars.sh RUN_A RUN_B NAME
set -e
cd "$(git rev-parse --show-toplevel)"
S=${STARFLOW:-./target/release/starflow}
a=$1; b=$2; name=$3
h=data/heldout-full-20261209-10000
[ -f $h/spectra.npy ] || $S synth --n 10000 --seed 20261209 --pixels-per-camera 4096 --out $h
out=runs/full/$name; mkdir -p $out
for s in 20261201-3000 20261209-10000; do
  d=data/heldout-full-$s
  /usr/bin/time -f "%e s wall, %M kB peak" $S evaluate -v --run $a --member $b --data $d --out $out/ensemble-$s > $out/ensemble.heldout-$s.txt 2>&1
  for r in $a $b; do
    [ -f $out/$(basename $r)-$s/metrics.json ] || $S evaluate --run $r --data $d --out $out/$(basename $r)-$s > $out/$(basename $r).heldout-$s.txt 2>&1
  done
done
d=data/heldout-full-20261209-10000
$S evaluate --run $a --member $b --data $d --raw --out $out/ensemble-20261209-10000-raw > $out/ensemble.heldout-20261209-10000-raw.txt 2>&1
echo "done $out $(date +%T)"
