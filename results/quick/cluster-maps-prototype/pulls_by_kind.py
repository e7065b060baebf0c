import sys, numpy as np, csv
p = sys.argv[1]
r = np.genfromtxt(p, delimiter=',', names=True)
labels = ['t_eff','log_g','fe_h']
snr = np.load('data/tune-1001/labels.npy')[:,7]
def stats(sel, name):
    out=[]
    for l in labels:
        pull = (r[l+'_true']-r[l+'_mean'])/r[l+'_std']
        pit = r[l+'_pit'][sel]
        pu = pull[sel]
        c68 = np.mean(np.abs(pit-0.5)<=0.3413)*100
        out.append(f"{l}: bias {np.mean(pu):+.2f} med {np.median(pu):+.2f} std {pu.std():.2f} mad/0.674 {np.median(np.abs(pu-np.median(pu)))/0.6745:.2f} c68 {c68:.1f} frac|p|>3 {np.mean(np.abs(pu)>3)*100:.1f}%")
    print(f"{name:22s} n={sel.sum():5d} "+" | ".join(out))
tg = r['log_g_true']; eg = r['log_g_mean']; tt=r['t_eff_true']; et=r['t_eff_mean']
stats(tg<3.5,'giants true')
stats(eg<3.5,'giants est')
stats((tg<3.5)&(eg<3.5),'giants true&est')
stats((tg<3.5)&(eg>=3.5),'giants true, est dwarf')
stats((tg>=3.5)&(eg<3.5),'dwarf true, est giant')
stats(tt<5000,'cool true')
stats(et<5000,'cool est')
stats(tt>=6000,'hot true')
stats(et>=6000,'hot est')
