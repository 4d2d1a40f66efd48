"""Batches the loss tests share: P x K labels, an unequal-class label set, seeded features."""
import torch


def pk_labels(p, k):
    """``p`` identities with ``k`` images each, grouped."""
    return torch.arange(p).repeat_interleave(k)


def unequal_labels(seed):
    """18 labels over 7 identities of sizes 5, 2, 3, 1, 4, 1, 2 (two singletons), shuffled."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0] * 5 + [1] * 2 + [2] * 3 + [3] + [4] * 4 + [5] + [6] * 2)
    return labels[torch.randperm(len(labels), generator=g)]


def features(n, d, seed, dtype=torch.float64, scale=2.0):
    """``n x d`` Gaussian features times ``scale``, drawn in float64 (same values for every dtype)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype)
