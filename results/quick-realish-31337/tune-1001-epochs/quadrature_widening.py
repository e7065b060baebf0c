# Diagnostic, not shipped: a two-parameter-per-label widening sigma^2 = (a s)^2 + (c / SNR)^2 fitted by
# Gaussian maximum likelihood on the first N stars of data/tune-1001 and scored on the last 5,000 per kind.
# python3 quadrature_widening.py RUN/eval-data N  (from the repo root; numpy needed)
import numpy as np, csv, sys
from math import erf
lab=np.load('data/tune-1001/labels.npy')
names=['t_eff','log_g','fe_h']; cols=[4,5,6]
run=sys.argv[1]; nfit=int(sys.argv[2]) if len(sys.argv)>2 else 1200
r=list(csv.DictReader(open(run+'/predictions.csv')))
snr=lab[:,7]; g=lab[:,5]; noise=1.0/snr
fit=np.arange(nfit); test=np.arange(5000,10000)
q=np.quantile(snr[test],[0.25,0.5,0.75]); b=np.digitize(snr,q)
kinds=[(f"SNR Q{k+1}", b==k) for k in range(4)]+[('giants',g<3.5),('dwarfs',g>=3.5)]
def cov(z,lvl): return np.mean(np.abs(z)<lvl)
tot=[0,0]
for j,n in enumerate(names):
    m=np.array([float(x[n+'_mean']) for x in r]); s=np.array([float(x[n+'_std']) for x in r]); t=lab[:,cols[j]]
    e=t-m
    best=None
    for a in np.linspace(0.3,1.5,61):
        for c in np.concatenate([[0],np.geomspace(1e-2*np.median(s)/np.median(noise),10*np.median(s)/np.median(noise),80)]):
            sig=np.sqrt((a*s[fit])**2+(c*noise[fit])**2)
            nll=np.mean(np.log(sig)+0.5*(e[fit]/sig)**2)
            if best is None or nll<best[0]: best=(nll,a,c)
    _,a,c=best
    for lab_,sig in [('as is',s),(f'a={a:.2f} c={c:.3g}',np.sqrt((a*s)**2+(c*noise)**2))]:
        z=e/sig; out=[]
        for kn,i in kinds:
            ii=i.copy(); ii[:5000]=False
            zz=z[ii]; c68=100*cov(zz,1.0); c95=100*cov(zz,2.0); ps=np.std(zz)
            ok=abs(c68-68.3)<=3 and abs(c95-95.4)<=2 and 0.93<=ps<=1.07
            out.append(f"{kn[:6]} {c68:4.1f}/{c95:4.1f}/{ps:.2f}{'' if ok else '*'}")
            if lab_!='as is': tot[0]+=ok; tot[1]+=1
        print(f"{n:6} {lab_:22} "+"  ".join(out))
print("named cells within targets after the quadrature widening:", tot)
