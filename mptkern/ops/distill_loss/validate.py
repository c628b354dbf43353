"""Checks of :func:`fused_distill_loss`'s arguments: shapes, dtypes, devices and weights at the entry
point; the label range (one host read) inside the op, so that ``torch.compile`` traces the entry point."""

from __future__ import annotations

import math

import torch

from mptkern.ops._common import GPU_DTYPES

REDUCTIONS = ("mean", "sum", "none")


def _validate(hs, ht, W, labels, temperature, weights, reduction, backend):
    if hs.dim() != 2:
        raise ValueError(f"student_hidden must have shape (N, d), got {tuple(hs.shape)}")
    N, d = hs.shape
    if N == 0 or d == 0:
        raise ValueError(f"student_hidden is empty: shape {(N, d)}, expected N >= 1 and d >= 1")
    if ht.shape != hs.shape:
        raise ValueError(f"teacher_hidden must have the student's shape {(N, d)}, got {tuple(ht.shape)}")
    if W.dim() != 2 or W.shape[1] != d or W.shape[0] == 0:
        raise ValueError(f"weight must have shape (V, d={d}) with V >= 1, got {tuple(W.shape)}")
    if not hs.dtype.is_floating_point:
        raise ValueError(f"student_hidden must be floating point, got {hs.dtype}")
    for name, t in (("teacher_hidden", ht), ("weight", W)):
        if t.dtype != hs.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but student_hidden has {hs.dtype}; all three must share one dtype")
    if backend != "torch" and hs.dtype not in GPU_DTYPES:
        raise ValueError(f"student_hidden has dtype {hs.dtype}; the {backend} backend supports {GPU_DTYPES}")
    named = [("teacher_hidden", ht), ("weight", W)] + ([("labels", labels)] if labels is not None else [])
    for name, t in named:
        if t.device != hs.device:
            raise ValueError(f"{name} is on {t.device} but student_hidden is on {hs.device}")
    if W.requires_grad:
        raise ValueError("weight requires grad, but fused_distill_loss is for frozen heads: it computes no weight gradient "
             "(freeze the lm_head, or pass weight.detach())")
    if labels is not None and (labels.shape != (N,) or labels.dtype.is_floating_point or labels.dtype.is_complex
                               or labels.dtype == torch.bool):
        raise ValueError(f"labels must be an integer tensor of shape (N={N},), got {labels.dtype} of shape {tuple(labels.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    for name, v in weights.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if weights["ce_weight"] > 0 and labels is None:
        raise ValueError("ce_weight > 0 needs labels: the cross-entropy term is taken against labels (N,)")


def _check_labels(labels, ignore_index, V):
    """Range check that needs the values (one host sync); inside the op so compile traces it."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        first = int(labels[bad][0])
        raise ValueError(f"labels must lie in [0, {V}) (V = weight.shape[0]) or equal ignore_index={ignore_index}, got {first}")
