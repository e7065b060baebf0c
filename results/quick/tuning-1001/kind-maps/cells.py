import sys, re
# count per-kind cells within targets from `starflow evaluate` stdout files
for path in sys.argv[1:]:
    txt = open(path).read()
    named = other = 0; nn = no = 0; misses = []
    nll = re.search(r"NLL (-?[0-9.]+) ± ([0-9.]+) \(z-units\)", txt)
    for line in txt.splitlines():
        m = re.match(r"\s+(SNR Q\d|giants|dwarfs|metal-poor|cool|hot)\b.*?\s(\d+)\s+(t_eff.*)$", line)
        if not m: continue
        kind = m.group(1); is_named = kind.startswith("SNR") or kind in ("giants", "dwarfs")
        for lab in m.group(3).split("; "):
            mm = re.match(r"(\w+) ([0-9.]+)±[0-9.]+ / ([0-9.]+)±[0-9.]+, ([0-9.]+)±", lab)
            name, c68, c95, ps = mm.group(1), float(mm.group(2)), float(mm.group(3)), float(mm.group(4))
            ok = abs(c68 - 68.27) <= 3 and abs(c95 - 95.45) <= 2 and 0.93 <= ps <= 1.07
            if is_named: nn += 1; named += ok
            else: no += 1; other += ok
            if not ok: misses.append(f"{kind}/{name} {c68}/{c95}/{ps}")
    print(f"{path.split('/')[-1]:40s} NLL {nll.group(1) if nll else '?'}  named {named}/{nn} other {other}/{no}  misses: {'; '.join(misses)}")
