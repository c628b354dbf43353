"""The torch path (any device): one batched matmul forward; the backward reduces per task with one
small one-hot matmul (deterministic on every device, unlike ``index_add_`` on CUDA)."""

from __future__ import annotations

import torch

from mptkern.ops.decomposed_prompts.rows import _prompt_rows


def _fwd_torch(shared, cols, rows, ids, out2d, offs):
    prompts = torch.bmm(cols.index_select(0, ids), rows.index_select(0, ids)).mul_(shared)
    if out2d is None:
        return prompts
    out2d.index_copy_(0, _prompt_rows(offs, shared.shape[0]), prompts.flatten(0, 1))
    return out2d


def _bwd_torch(grad2d, shared, cols, rows, ids, offs):
    (K, l, r), d = cols.shape, shared.shape[1]
    g = grad2d.view(-1, l * d) if offs is None else grad2d.index_select(0, _prompt_rows(offs, l)).view(-1, l * d)
    tasks, inverse = torch.unique(ids, return_inverse=True)
    # H_t as one small matmul: deterministic on every device, unlike index_add_ on CUDA
    onehot = torch.zeros(tasks.numel(), ids.numel(), dtype=torch.float32, device=ids.device)
    onehot[inverse, torch.arange(ids.numel(), device=ids.device)] = 1.0
    H = (onehot @ g.float()).view(-1, l, d)
    c, rr, s = cols[tasks].float(), rows[tasks].float(), shared.float()
    W = H * s
    dS = (H * torch.bmm(c, rr)).sum(0)
    dC = torch.zeros(K, l, r, dtype=cols.dtype, device=cols.device)
    dR = torch.zeros(K, r, d, dtype=rows.dtype, device=rows.device)
    dC[tasks] = torch.bmm(W, rr.transpose(1, 2)).to(cols.dtype)
    dR[tasks] = torch.bmm(c.transpose(1, 2), W).to(rows.dtype)
    return dS.to(shared.dtype), dC, dR

