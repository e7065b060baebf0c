"""Every variant of widening.py on the learning-curve runs (single runs, then 2- and 3-member
ensembles). Needs each run's raw predictions on its validation split and on data/tune-1001:
  starflow evaluate --run R --split val --raw --out R/eval-val-raw
  starflow evaluate --run R --data data/tune-1001 --raw --out R/eval-tune-raw
  (ensembles: --member B [--member C], out R/eval-ens2-*-raw etc.)
Run from the repository root: python results/quick-realish-31337/tune-1001-parametric/run.py"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import widening
from widening import LAB, run, fails

POOL = "data/lc-pool-7-25000/labels.npy"
TUNE = "data/tune-1001/labels.npy"
VARIANTS = [("none", "-"), ("noise", "ml"), ("noise", "qr"), ("noise+nq", "ml"), ("noise+nq", "qr"),
            ("noise+hinge", "ml"), ("noise+hinge", "qr"), ("noise+means", "qr"), ("noise+nq+giant", "ml")]
NAMED = ["snr1", "snr2", "snr3", "snr4", "giant", "dwarf"]


def report(run_dir, tag, half):
    widening.HALF = half
    print(f"== {run_dir} {tag} ({'median, half-width' if half else 'mean, std'})")
    for which, method in VARIANTS:
        res = run(f"{run_dir}/eval-{tag}val-raw/predictions.csv", POOL,
                  f"{run_dir}/eval-{tag}tune-raw/predictions.csv", TUNE, which, method)
        named = sum(res[l][k][3] for l in LAB for k in NAMED)
        other = sum(res[l][k][3] for l in LAB for k in ["mpoor", "cool", "hot"])
        print(f"  {which:15s} {method:3s} {named:2d}/18 {other}/9  misses: " + " ".join(fails(res)))


for r in ["tiny_cnn-n5400-e24", "seed2-n5400-e24", "seed3-n5400-e24", "tiny_cnn-n2700-e32",
          "tiny_cnn-n5400-e12", "tiny_cnn-n10800-e8"]:
    report(f"runs/lc/{r}", "", False)
for r, tag in [("tiny_cnn-n5400-e24", "ens2-"), ("tiny_cnn-n5400-e24", "ens3-"), ("seed2-n5400-e24", "ens23-")]:
    report(f"runs/lc/{r}", tag, False)
