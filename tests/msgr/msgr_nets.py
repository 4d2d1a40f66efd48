"""Shared by the tests/msgr files: a tiny two-stage network and the step helpers."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from torchreid_ext.msgr import msgr_backward

INF = float("inf")
STAGES = ["stage1", "stage2"]


class TinyNet(nn.Module):
    """Two named stages; smooth activations so finite differences are clean."""

    def __init__(self, bn=False, dropout=0.0, classes=5, width=4, relu=False):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
        act = (lambda: nn.ReLU(inplace=True)) if relu else nn.Softplus
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), norm(width), act())
        self.stage1 = nn.Sequential(nn.Conv2d(width, 6, 3, stride=2, padding=1), norm(6), nn.Tanh())
        # relu: a max-pool and a functional ReLU after stage 1, ReLU modules elsewhere
        self.pool = nn.MaxPool2d(3, 1, 1) if relu else nn.Identity()
        self.relu = relu
        self.stage2 = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), norm(8), act())
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(8, classes)

    def forward(self, x):
        x = self.pool(self.stage1(self.stem(x)))
        x = self.stage2(F.relu(x) - 0.1 * F.relu(-x) if self.relu else x)
        return self.classifier(self.drop(x.mean((2, 3))))


def make(seed=0, dtype=torch.float64, batch=6, size=8, **kw):
    torch.manual_seed(seed)
    net = TinyNet(**kw).to(dtype)
    x = torch.randn(batch, 3, size, size, dtype=dtype)
    y = torch.randint(0, 5, (batch,))
    return net, x, y


def ref_norm(v, q, squared):
    """||v||_q of the flattened tensor, by hand (squared if asked)."""
    v = v.flatten()
    n = v.abs().max() if q == INF else v.abs().sum() if q == 1 else v.pow(2).sum().sqrt()
    return n ** 2 if squared else n


def flat_grads(net):
    return torch.cat([p.grad.flatten() for p in net.parameters()])


def run_mode(net, x, y, mode, **kw):
    """One MSGR backward (cross-entropy) from zero gradients: (MSGRStep, flat gradients)."""
    net.zero_grad()
    torch.manual_seed(123)  # same dropout masks in both modes
    step = msgr_backward(net, lambda: net(x), lambda out: F.cross_entropy(out, y), STAGES, kw.pop("eps", [0.3, 0.1]),
                         mode=mode, **kw)
    return step, flat_grads(net).clone()


def plain_grads(net, x, y):
    net.zero_grad()
    torch.manual_seed(123)
    F.cross_entropy(net(x), y).backward()
    return flat_grads(net).clone()


def cosine(a, b):
    return (a @ b / (a.norm() * b.norm())).item()
