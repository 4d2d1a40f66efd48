"""The small two-stage network of the DDP tests (gloo on the CPU, NCCL on GPUs)."""
import torch
import torch.nn as nn


class StageNet(nn.Module):
    """conv1 -> layer1 -> layer2 -> fc embedding (8-d) -> classifier. Tanh keeps the MSGR penalty
    smooth; ``bn`` adds BatchNorm to the stages (a DDP step then equals the one-process step only
    with SyncBatchNorm). Training mode returns (logits, embedding), eval mode the embedding."""

    def __init__(self, classes: int, bn: bool = False):
        super().__init__()
        norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), norm(6), nn.Tanh())
        self.layer2 = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), norm(8), nn.Tanh())
        self.fc = nn.Linear(8, 8)
        self.classifier = nn.Linear(8, classes)

    def forward(self, x):
        f = self.fc(self.layer2(self.layer1(torch.tanh(self.conv1(x)))).mean((2, 3)))
        return (self.classifier(f), f) if self.training else f
