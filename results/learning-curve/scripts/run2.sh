#!/bin/bash
# Variants at N training stars from the learning-curve pool: run2.sh TAG N EPOCHS BACKBONE [--set k=v ...]
set -e
cd "$(git rev-parse --show-toplevel)"
S=./target/release/starflow
POOL=data/lc-pool-7-25000
TEST=data/lc-test-1001-3000
tag=$1 n=$2 e=$3 bb=$4; shift 4
out=runs/lc/$tag
tf=$(python3 -c "print($n/25000)"); sf=$(python3 -c "print(round(1-$n/25000-0.048, 10))")
rm -rf $out
/usr/bin/time -f "%e s wall" $S train --config configs/quick.toml --backbone $bb --flow diagonal_gaussian \
  --set data.dir=$POOL --set data.synthetic=false --set data.calibration_n=0 \
  --set data.train_fraction=$tf --set data.val_fraction=0.048 --set data.test_fraction=$sf \
  --set optim.epochs=$e --set optim.patience=$e "$@" --out $out > $out.train.log 2>&1
$S evaluate --run $out --data $TEST > $out.eval.txt 2>&1
$S evaluate --run $out --data $TEST --raw --out $out/eval-raw > $out.raw.txt 2>&1
echo "done $out $(date +%T)"
