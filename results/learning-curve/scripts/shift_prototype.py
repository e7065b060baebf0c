# Issue 29, 2026-12-08: the numpy prototype of the widening's shifts (calibration.rs, fit_hinges),
# run before they were built. A per-star location-and-scale hinge model of the standardised errors,
# e = (true - mean) / std = mu(x) + w(x) u, x = (-ln SNR, the three posterior means), knots at each
# covariate's lowest, median and highest value, fitted on one set of predictions and scored per
# kind of star on another (empirical central intervals of u). Usage (numpy needed):
#   python shift_prototype.py FIT/predictions.csv FIT_LABELS.npy TEST/predictions.csv TEST_LABELS.npy
# with `starflow evaluate --raw` predictions (the model's own posteriors) and the sets' labels.npy.
import numpy as np, csv, sys
def load(p, labels):
    r=list(csv.DictReader(open(p)))
    f=lambda k: np.array([float(x[k]) for x in r])
    rows=f('row').astype(int)
    L=np.load(labels)
    snr=L[rows,7]
    d={}
    for n in ['t_eff','log_g','fe_h']:
        d[n]=(f(n+'_mean'),f(n+'_std'),f(n+'_true'))
    return d, snr
def hats(x, knots):
    x=np.clip(x,knots[0],knots[-1]); B=np.zeros((len(x),len(knots)))
    k=np.clip(np.searchsorted(knots,x,side='right'),1,len(knots)-1)
    t=(x-knots[k-1])/(knots[k]-knots[k-1])
    B[np.arange(len(x)),k-1]=1-t; B[np.arange(len(x)),k]=t
    return B
def design(cov, knots):
    cols=[]
    for c,(x,kn) in enumerate(zip(cov,knots)):
        B=hats(x,kn)
        if c>0: B=np.delete(B,len(kn)//2,axis=1)
        cols.append(B)
    return np.hstack(cols)
def fit(X, e, shift, rounds=20):
    p=X.shape[1]; mu=np.zeros(len(e)); th=np.zeros(p); th[:]=np.log(np.sqrt(np.mean(e**2)))
    for _ in range(rounds):
        if shift:
            w2=np.exp(2*X@th); W=1/w2
            beta=np.linalg.solve((X*W[:,None]).T@X+1e-6*np.eye(p),(X*W[:,None]).T@e)
            mu=X@beta
        r2=np.minimum(np.abs(e-mu),6*np.exp(X@th))**2
        for _ in range(30):
            l=X@th; rr=r2*np.exp(-2*l)
            g=X.T@(1-rr); H=(X*(2*rr)[:,None]).T@X+1e-9*np.eye(p)
            th-= np.linalg.solve(H,g)
    return (beta if shift else np.zeros(p)), th
def covs(d,snr):
    return [-np.log(snr)]+[d[n][0] for n in ['t_eff','log_g','fe_h']]
fitp, fitl, testp, testl = sys.argv[1:5]
dv,sv=load(fitp,fitl); dt,st=load(testp,testl)
cv=covs(dv,sv); ct=covs(dt,st)
knots=[np.array([x.min(),np.median(x),x.max()]) for x in cv]
Xv=design(cv,knots); Xt=design(ct,knots)
tt=dt['t_eff'][2]; lg=dt['log_g'][2]
groups={'Q1':st<np.quantile(st,.25),'Q4':st>=np.quantile(st,.75),'giants':lg<3.5,'dwarfs':lg>=3.5,'cool':tt<5000,'hot':tt>=6000,'metal-poor':dt['fe_h'][2]<-0.5,'all':np.ones_like(tt,bool)}
for n in ['t_eff','log_g','fe_h']:
    m,s,t=dv[n]; e=(t-m)/s
    mt,stt,tr=dt[n]; et=(tr-mt)/stt
    for shift in [False,True]:
        beta,th=fit(Xv,e,shift)
        u=(e-Xv@beta)/np.exp(Xv@th)
        # global quantile map: central intervals from empirical quantiles of u on val
        q=np.quantile(u,[0.02275,0.1587,0.8413,0.97725])
        ut=(et-Xt@beta)/np.exp(Xt@th)
        loc=np.median(u); sc=(q[2]-q[1])/2
        out=[]
        for g,mask in groups.items():
            x=ut[mask]
            c68=np.mean((x>q[1])&(x<q[2])); c95=np.mean((x>q[0])&(x<q[3]))
            ps=((x-loc)/sc).std()
            ok = abs(100*c68-68.3)<=3 and abs(100*c95-95.4)<=2 and 0.93<=ps<=1.07
            out.append(f"{g} {100*c68:.1f}/{100*c95:.1f}/{ps:.2f}{'' if ok else '*'}")
        print(n, 'shift' if shift else 'scale', ' | '.join(out))
