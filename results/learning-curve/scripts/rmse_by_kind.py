# RMSE / median marginal CRLB per SNR quarter and giants/dwarfs, from `starflow evaluate`'s predictions.csv
# and the held-out set's labels.npy and crlb_marginal.npy. Usage: rmse_by_kind.py PREDICTIONS.csv DATA_DIR
import sys, numpy as np, csv
pred, data = sys.argv[1], sys.argv[2]
rows = list(csv.DictReader(open(pred)))
lab = np.load(f"{data}/labels.npy"); crlb = np.load(f"{data}/crlb_marginal.npy")
idx = np.array([int(r["row"]) for r in rows])
snr = lab[idx, 7]; logg = lab[idx, 5]
names = ["t_eff", "log_g", "fe_h"]
err = np.array([[float(r[f"{n}_mean"]) - float(r[f"{n}_true"]) for n in names] for r in rows])
cr = crlb[idx]
q = np.quantile(snr, [0.25, 0.5, 0.75])
groups = {"all": np.ones(len(idx), bool),
  "SNR Q1": snr < q[0], "SNR Q2": (snr >= q[0]) & (snr < q[1]), "SNR Q3": (snr >= q[1]) & (snr < q[2]), "SNR Q4": snr >= q[2],
  "giants": logg < 3.5, "dwarfs": logg >= 3.5}
print(f"{'group':8s} {'n':>5s} " + " ".join(f"{n+' RMSE':>12s} {'/CRLB':>6s}" for n in names))
for g, m in groups.items():
    s = f"{g:8s} {m.sum():5d} "
    for j in range(3):
        rmse = np.sqrt(np.mean(err[m, j] ** 2)); s += f"{rmse:12.4f} {rmse / np.median(cr[m, j]):6.2f} "
    print(s)
