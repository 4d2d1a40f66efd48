"""BatchNorm for exact MSGR's double backward (docs/methods.md G4, G6).

Exact mode differentiates the stage gradients g_s once more (``create_graph=True``), so every
BatchNorm's backward is itself back-propagated. PyTorch's native double backward of
batch_norm was the largest cost of exact MSGR (1.1 s of a 2.2 s msfl_resnet50 CPU step);
inside :class:`FusedBatchNormDoubleBackward`, training-mode ``F.batch_norm`` runs the same
kernels with the same values and running statistics, and its double backward costs ~3x less.

SyncBatchNorm has no double backward: exact mode cannot use it (:func:`check_double_backward`,
which MSGREngine calls at construction; fast mode needs no double backward).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..distributed import unwrap_model

__all__ = ["FusedBatchNormDoubleBackward", "find_sync_batchnorm", "check_double_backward"]


class _BNBackward(torch.autograd.Function):
    """Training-mode BatchNorm backward (native kernel) with a cheap backward of its own.

    PyTorch's double backward of batch_norm takes ~20 full-size passes; on msfl_resnet50 it
    was the largest single cost of exact MSGR (1.1 s of a 2.2 s CPU step). With x_hat the
    normalised input, P(v) = v - mean(v) - x_hat * mean(v * x_hat) per channel, and
    dx = gamma * invstd * P(dy), the gradients for an incoming (u = d/d dx, gdw, gdb) are
    per-channel affine combinations of dy, u and x_hat (checked against finite differences by
    torch.autograd.gradgradcheck in tests/msgr/test_msgr_batchnorm.py):

        d dy    = gamma invstd P(u) + gdw x_hat + gdb
        d x     = -gamma invstd^2 [mean(u x_hat) P(dy) + m2 P(u) + x_hat T / M] + gdw invstd P(dy)
        d gamma = T invstd,   T = sum(u dy) - M (m1 mean(u) + m2 mean(u x_hat)),

    m1 = mean(dy), m2 = mean(dy x_hat) (from the first backward's dbeta, dgamma), M the
    elements per channel: three reductions and five fused multiply-adds.
    """

    @staticmethod
    def forward(ctx, dy, x, weight, mean, invstd, eps):
        w = weight if weight is not None else torch.ones_like(mean)
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(
            dy, x, w, None, None, mean, invstd, True, eps, [True, True, True])
        ctx.save_for_backward(dy, x, weight, mean, invstd, dw, db)
        return dx, dw, db

    @staticmethod
    def backward(ctx, gdx, gdw, gdb):
        dy, x, weight, mean, invstd, dw, db = ctx.saved_tensors
        shape = [1, -1] + [1] * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))
        M = x.numel() // x.shape[1]
        inv = invstd.view(shape)
        gi = inv if weight is None else weight.view(shape) * inv
        xh = torch.addcmul(-mean.view(shape) * inv, x, inv)
        m1, m2 = db.view(shape) / M, dw.view(shape) / M
        if gdx is not None:
            mu = gdx.sum(dims, keepdim=True) / M
            mux = (gdx * xh).sum(dims, keepdim=True) / M
            T = (gdx * dy).sum(dims, keepdim=True) - M * (m1 * mu + m2 * mux)
        else:
            mu = mux = T = torch.zeros_like(inv)
        gi2 = gi * inv
        a, b = -gi2 * mux, -gi2 * m2  # d x = a dy + b u + c x_hat + d
        c, d = -gi2 * (T / M - 2 * m2 * mux), gi2 * (mux * m1 + m2 * mu)
        f, g = -gi * mux, -gi * mu  # d dy = gi u + f x_hat + g
        if gdw is not None:
            gw = gdw.view(shape)
            a, c, d, f = a + gw * inv, c - gw * inv * m2, d - gw * inv * m1, f + gw
        if gdb is not None:
            g = g + gdb.view(shape)
        grad_x = torch.addcmul(d, c, xh).addcmul_(a, dy)
        grad_dy = torch.addcmul(g, f, xh)
        if gdx is not None:
            grad_x.addcmul_(b, gdx)
            grad_dy.addcmul_(gi, gdx)
        grad_x = grad_x.expand_as(x).to(x.dtype)
        grad_dy = grad_dy.expand_as(dy).to(dy.dtype)
        grad_w = (T * inv).view(-1).to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        return grad_dy, grad_x, grad_w, None, None, None


class _BNTrain(torch.autograd.Function):
    """Training-mode batch_norm (native kernels, running statistics updated as usual) whose
    backward is :class:`_BNBackward`, so a double backward uses the cheap formula."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        y, mean, invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        dx, dw, db = _BNBackward.apply(dy, x, weight, mean, invstd, ctx.eps)
        return (dx, dw if weight is not None else None, db if ctx.has_bias else None,
                None, None, None, None)


def _bind_bn(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    return input, running_mean, running_var, weight, bias, training, momentum, eps


class FusedBatchNormDoubleBackward(TorchFunctionMode):
    """Inside the block, training-mode ``F.batch_norm`` calls with gradients use
    :class:`_BNTrain` (same values and running statistics; a ~3x cheaper double backward).
    Exact mode enables it around the forward (``fused_bn=True``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm and torch.is_grad_enabled():
            x, rm, rv, w, b, training, momentum, eps = _bind_bn(*args, **kwargs)
            if training and any(t is not None and t.requires_grad for t in (x, w, b)):
                F._verify_batch_size(x.size())
                return _BNTrain.apply(x, w, b, rm, rv, momentum, eps)
        return func(*args, **kwargs)


def find_sync_batchnorm(model: nn.Module) -> List[str]:
    """Names of SyncBatchNorm modules (no double backward: exact MSGR cannot use them)."""
    return [n for n, m in unwrap_model(model).named_modules() if isinstance(m, nn.SyncBatchNorm)]


def check_double_backward(model: nn.Module) -> None:
    """Raise ValueError if ``model`` has SyncBatchNorm modules, which exact MSGR cannot
    double-backward through (fast mode can: it needs no double backward)."""
    sync = find_sync_batchnorm(model)
    if sync:
        raise ValueError(
            f"MSGR exact mode needs a double backward, which SyncBatchNorm does not have "
            f"(model has {len(sync)}, e.g. '{sync[0]}'); set msgr.mode fast, or "
            "train.sync_bn False (plain BatchNorm)"
        )
