# Per SNR quarter and for giants/dwarfs: t_eff RMSE of the posterior means against the mean posterior std
# (recalibrated, as predictions.csv holds them), on data/tune-1001 (run from the repo root, numpy needed):
# python3 width_by_snr.py RUN/eval-data [...]
import numpy as np, csv, sys
lab=np.load('data/tune-1001/labels.npy')
for run in sys.argv[1:]:
    r=list(csv.DictReader(open(run+'/predictions.csv')))
    m=np.array([float(x['t_eff_mean']) for x in r]); s=np.array([float(x['t_eff_std']) for x in r])
    t=lab[:,4]; snr=lab[:,7]; g=lab[:,5]
    q=np.quantile(snr,[0.25,0.5,0.75]); b=np.digitize(snr,q)
    print(run)
    for k in range(4):
        i=b==k; e=m[i]-t[i]
        print(f"  SNR Q{k+1}: median SNR {np.median(snr[i]):6.1f}  RMSE {np.sqrt(np.mean(e**2)):6.1f}  mean std {np.mean(s[i]):6.1f}  ratio {np.sqrt(np.mean(e**2))/np.mean(s[i]):.2f}")
    for name,i in [('giants',g<3.5),('dwarfs',g>=3.5)]:
        e=m[i]-t[i]
        print(f"  {name}: RMSE {np.sqrt(np.mean(e**2)):6.1f}  mean std {np.mean(s[i]):6.1f} bias {np.mean(e):+.1f} ratio {np.sqrt(np.mean(e**2))/np.mean(s[i]):.2f}")
