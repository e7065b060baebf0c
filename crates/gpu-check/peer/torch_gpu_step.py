"""PyTorch peer of starflow-gpu-check's timing section: one training step (diagonal-Gaussian NLL, Adam) or one
eval forward of the reference's two backbones, on any torch device, timed with the device synchronised.

The layer stacks are those of ../shared/reference/peer (time_torch.py's SpectrumEncoder = CNNModel, and
torch_tiny_step.py's TinyCNN), restated here so the script runs on a GPU machine without jammy_flows: the
diagonal Gaussian needs no flow library, and its head has the same 6 outputs as starflow's.

Usage: torch_gpu_step.py BACKBONE(cnn|tiny_cnn) MODE(train|eval) DEVICE(cuda|cpu|mps) BATCH N_PIX STEPS
Prints 'median_s=... min_s=...'."""
import sys, time, statistics, torch, torch.nn as nn

backbone, mode, device = sys.argv[1], sys.argv[2], sys.argv[3]
batch, n_pix, steps = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
device = {"metal": "mps"}.get(device, device)
if device == "cpu":
    torch.set_num_threads(2)
torch.manual_seed(0)
p = 0.1


def cnn(n_out):
    chans, layers = [1, 16, 32, 64, 64, 128], []
    for i in range(5):
        layers += [nn.Conv1d(chans[i], chans[i + 1], 3), nn.ReLU()]
        layers += [nn.BatchNorm1d(chans[i + 1])] if i < 4 else []
        layers += [nn.Dropout(p), nn.AvgPool1d(2)]
    layers += [nn.Conv1d(128, 64, 1), nn.Dropout(p), nn.AdaptiveAvgPool1d(1), nn.Flatten(1),
               nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, n_out)]
    return nn.Sequential(*layers)


def blk(ci, co, k, pool, drop, relu_bn=True):
    layers = [nn.Conv1d(ci, co, k)] + ([nn.ReLU(), nn.BatchNorm1d(co)] if relu_bn else [])
    return layers + ([nn.AvgPool1d(pool)] if pool > 1 else []) + [nn.Dropout(drop)]


class Tiny(nn.Module):
    def __init__(self, n_out):
        super().__init__()
        self.model = nn.Sequential(*blk(1, 32, 5, 1, p), *blk(32, 32, 5, 3, p), *blk(32, 64, 5, 3, p),
                                   *blk(64, 128, 1, 2, p), *blk(128, 128, 3, 1, 2 * p),
                                   *blk(128, 128, 1, 1, 2 * p, False))
        with torch.no_grad():
            lf = self.model(torch.zeros(2, 1, n_pix)).shape[-1]
        self.len_linear = nn.Linear(lf, 32)
        self.l1 = nn.Linear(128 * 32, 128)
        self.out = nn.Linear(128, n_out)

    def forward(self, x):
        h = torch.relu(self.len_linear(self.model(x))).flatten(1)
        return self.out(torch.relu(self.l1(h)))


m = (Tiny(6) if backbone == "tiny_cnn" else cnn(6)).to(device)
opt = torch.optim.Adam(m.parameters(), lr=1e-4)
x = torch.randn(batch, 1, n_pix, device=device)
y = torch.randn(batch, 3, device=device)


def sync():
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def step():
    if mode == "train":
        m.train(); opt.zero_grad(); th = m(x)
        mu, ls = th[:, :3], th[:, 3:]
        loss = (0.5 * ((y - mu) * torch.exp(-ls)) ** 2 + ls).sum(-1).mean(); loss.backward(); opt.step()
    else:
        m.eval()
        with torch.no_grad():
            m(x)


for _ in range(2):
    step()
sync()
ts = []
for _ in range(steps):
    t0 = time.perf_counter(); step(); sync(); ts.append(time.perf_counter() - t0)
print(f"torch backbone={backbone} mode={mode} device={device} median_s={statistics.median(ts):.5f} min_s={min(ts):.5f}")
