"""Summarise `starflow evaluate` outputs: NLL, RMSE and RMSE/marginal CRLB per label, and the cells
of the per-kind table within the issue-29 targets (68 % within 68.3 +- 3, 95 % within 95.4 +- 2,
pull std 0.93-1.07)."""
import re, sys
NAMED = ("SNR Q1", "SNR Q2", "SNR Q3", "SNR Q4", "giants", "dwarfs")
def parse(path):
    t = open(path).read()
    nll = re.search(r"NLL (-?[\d.]+) ± ([\d.]+) \(z-units\)", t)
    out = {"nll": float(nll.group(1)), "nll_se": float(nll.group(2))}
    for lab in ("t_eff", "log_g", "fe_h"):
        m = re.search(rf"^\s+{lab}\s+([\d.]+) ± ([\d.]+).*?\s([\d.]+)\s+([\d.]+)\s*$", t, re.M)
        out[lab] = (float(m.group(1)), float(m.group(2)), float(m.group(4)))
    named = other = nn = no = 0
    for line in t.splitlines():
        s = line.strip()
        if not re.match(r"^(SNR Q\d|giants|dwarfs|metal-poor|cool|hot)", s):
            continue
        is_named = s.startswith(NAMED)
        for c68, c95, ps in re.findall(r"([\d.]+)±[\d.]+ / ([\d.]+)±[\d.]+, ([\d.]+)±", s):
            ok = abs(float(c68) - 68.3) <= 3 and abs(float(c95) - 95.4) <= 2 and 0.93 <= float(ps) <= 1.07
            if is_named: named += ok; nn += 1
            else: other += ok; no += 1
    out["named"], out["other"] = f"{named}/{nn}", f"{other}/{no}"
    return out
print("| run | NLL (z) | t_eff RMSE (K) | log g RMSE | [Fe/H] RMSE | RMSE/CRLB t_eff / log g / [Fe/H] | named cells | other cells |")
print("|---|---|---|---|---|---|---|---|")
for p in sys.argv[1:]:
    o = parse(p)
    name = p.split("/")[-1].replace(".eval.txt", "").replace(".txt", "")
    print(f"| {name} | {o['nll']:.3f} ± {o['nll_se']:.3f} | {o['t_eff'][0]:.1f} ± {o['t_eff'][1]:.1f} | {o['log_g'][0]:.4f} | {o['fe_h'][0]:.4f} | {o['t_eff'][2]:.2f} / {o['log_g'][2]:.2f} / {o['fe_h'][2]:.2f} | {o['named']} | {o['other']} |")
