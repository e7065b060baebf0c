"""The issue-29 named cells of an evaluate output: python cells.py PREDICTIONS.csv LABELS.npy.
SNR quarters by the labels' SNR column, giants log g < 3.5; coverage from the PIT column, pull
from mean and std. Matches the "by kind of star" lines of `starflow evaluate`."""
import sys, numpy as np
LAB = ["t_eff", "log_g", "fe_h"]
d=np.genfromtxt(sys.argv[1],delimiter=',',names=True); L=np.load(sys.argv[2]); rows=d['row'].astype(int); snr=L[rows,7]
t=np.stack([d[l+'_true'] for l in LAB],1)
qs=np.quantile(snr,[0.25,0.5,0.75])
bins={'snr1':snr<qs[0],'snr2':(snr>=qs[0])&(snr<qs[1]),'snr3':(snr>=qs[1])&(snr<qs[2]),'snr4':snr>=qs[2],'giant':t[:,1]<3.5,'dwarf':t[:,1]>=3.5}
n=0;fl=[]
for l in LAB:
    p=d[l+'_pit']; pull=(d[l+'_true']-d[l+'_mean'])/d[l+'_std']
    for k,b in bins.items():
        c68=np.mean(np.abs(p[b]-0.5)<0.34135)*100; c95=np.mean(np.abs(p[b]-0.5)<0.4772)*100; ps=pull[b].std()
        ok=abs(c68-68.27)<=3 and abs(c95-95.45)<=2 and 0.93<=ps<=1.07; n+=ok
        if not ok: fl.append(f"{l}.{k}({c68:.1f},{c95:.1f},{ps:.2f})")
print(n,'/18',' '.join(fl))
