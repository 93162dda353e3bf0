"""The divergence in chunked eager torch: the operators' native CPU kernel, and the top-k variants on every
device (torch.topk per row chunk). Tensors in, tensors out, no autograd; temporaries bounded by row chunks of
about CHUNK_BYTES per [rows, V] fp32 buffer. Same outputs as the Triton launchers
(ops/_divergence_launch.py).

Per token, over the buckets of the two distributions (the vocabulary, or the top-k ids with or without the
tail bucket) with log-probabilities lq_S, lq_T: D and h = q_S * dD/dq_S (up to a per-row multiple of q_S,
which the softmax's Jacobian cancels); then dD/dz_S = (P - p * sum(h)) / T, where P puts h on the vocabulary
entries (a tail bucket's h spread over the untaken entries in proportion to p_S) and p is the student's
distribution the buckets were taken from (renormalised over the k ids without the tail). docs/divergence.md.
"""

from __future__ import annotations

import math

import torch

CHUNK_BYTES = 16 << 20
GPU_CHUNK_BYTES = 64 << 20  # fewer, larger launches on a GPU (a few such buffers live at once)


def chunk_rows(V, nbytes=CHUNK_BYTES):
    """Rows per chunk: one [rows, V] fp32 temporary of about nbytes."""
    return max(1, nbytes // (4 * max(V, 1)))


def _xlogy_diff(q, a, b):
    return torch.where(q == 0, torch.zeros_like(q), q * (a - b))  # 0 log 0 = 0; NaN stays NaN


def bucket_terms(lq_s, lq_t, beta):
    """(D [R], h [R, K]) of JSD_beta between log-prob rows [R, K] (exact KL forms at beta = 0 and 1)."""
    q_s, q_t = lq_s.exp(), lq_t.exp()
    if beta == 0.0:
        return _xlogy_diff(q_t, lq_t, lq_s).sum(-1), -q_t
    if beta == 1.0:
        kl = _xlogy_diff(q_s, lq_s, lq_t)
        return kl.sum(-1), kl
    lm = torch.logaddexp(lq_s + math.log(1.0 - beta), lq_t + math.log(beta))
    ks = (1.0 - beta) * _xlogy_diff(q_s, lq_s, lm)
    return (beta * _xlogy_diff(q_t, lq_t, lm) + ks).sum(-1), ks


def _buckets(z_s, z_t, params):
    """(lq_s, lq_t [R, K'], ids [R, k] or None, lse_s [R], lse_t [R]) of scaled logits [R, V]."""
    lse_s, lse_t = torch.logsumexp(z_s, -1), torch.logsumexp(z_t, -1)
    if params.topk is None:
        return z_s - lse_s[:, None], z_t - lse_t[:, None], None, lse_s, lse_t
    ids = torch.topk(z_s if params.topk_from == "student" else z_t, params.topk, dim=-1).indices
    k_s, k_t = z_s.gather(-1, ids), z_t.gather(-1, ids)
    if not params.add_tail:
        return torch.log_softmax(k_s, -1), torch.log_softmax(k_t, -1), ids, lse_s, lse_t
    out = []
    for k, lse in ((k_s, lse_s), (k_t, lse_t)):
        lk = k - lse[:, None]
        mass = torch.logsumexp(lk, -1, keepdim=True).clamp(max=0.0)
        out.append(torch.cat([lk, torch.log(-torch.expm1(mass))], -1))  # the tail: log(1 - sum of the k)
    return out[0], out[1], ids, lse_s, lse_t


def _row_views(x, y):
    """[B, T, V] or [N, V] pair as lists of matching [rows, V] views of the rows in order (a slice is not
    copied)."""
    if x.dim() == 2:
        return [x], [y]
    try:
        return [x.view(-1, x.shape[-1])], [y.view(-1, y.shape[-1])]
    except RuntimeError:
        return list(x.unbind(0)), list(y.unbind(0))


def _chunks(student, teacher, mask, inv_temp):
    """Yields (slice of the N rows, z_s, z_t, valid) over row chunks: fp32 scaled logits, masked rows 0."""
    V = student.shape[-1]
    step = chunk_rows(V, CHUNK_BYTES if student.device.type == "cpu" else GPU_CHUNK_BYTES)
    r = 0
    for xs, ys in zip(*_row_views(student, teacher), strict=True):
        for r0 in range(0, xs.shape[0], step):
            n = min(xs.shape[0] - r0, step)
            sl = slice(r + r0, r + r0 + n)
            valid = mask[sl].bool()
            keep = valid[:, None]
            z_s = torch.where(keep, xs[r0:r0 + n].float() * inv_temp, 0.0)  # a masked row's NaN is not read
            z_t = torch.where(keep, ys[r0:r0 + n].float() * inv_temp, 0.0)
            yield sl, z_s, z_t, valid
        r += xs.shape[0]


def torch_fwd(student, teacher, targets, mask, params):
    """student, teacher [B, T, V] or [N, V], targets [N] int64 or None, mask [N] (nonzero: valid).

    Returns (div [N], logp [N] of the targets (0 without targets or at masked rows, NaN for an id >= V),
    stats [N, 3] = (lse_s, lse_t, sum h)), fp32, each 0 at masked rows.
    """
    V = student.shape[-1]
    N = student.numel() // max(V, 1)
    div = torch.zeros(N, dtype=torch.float32, device=student.device)
    lp = torch.zeros_like(div)
    stats = torch.zeros(N, 3, dtype=torch.float32, device=student.device)
    for sl, z_s, z_t, valid in _chunks(student, teacher, mask, 1.0 / params.temperature):
        lq_s, lq_t, _, lse_s, lse_t = _buckets(z_s, z_t, params)
        d, h = bucket_terms(lq_s, lq_t, params.beta)
        div[sl] = torch.where(valid, d, 0.0)
        stats[sl] = torch.where(valid[:, None], torch.stack([lse_s, lse_t, h.sum(-1)], -1), 0.0)
        if targets is not None:
            t = targets[sl]
            z_y = z_s.gather(-1, t.clamp(0, V - 1)[:, None])[:, 0]
            y = torch.where(t < V, z_y - lse_s, float("nan"))
            lp[sl] = torch.where(valid & (t >= 0), y, 0.0)
    return div, lp, stats


def torch_bwd(student, teacher, mask, stats, grad, params, out_dtype=None):
    """d(sum_t grad_t D_t)/d student, shaped like it, in out_dtype (default: the student's); 0 at masked rows.
    stats (the forward's) are not needed: everything is recomputed per chunk."""
    V = student.shape[-1]
    N = student.numel() // max(V, 1)
    out = torch.empty(N, V, dtype=out_dtype or student.dtype, device=student.device)
    for sl, z_s, z_t, valid in _chunks(student, teacher, mask, 1.0 / params.temperature):
        lq_s, lq_t, ids, lse_s, _ = _buckets(z_s, z_t, params)
        _, h = bucket_terms(lq_s, lq_t, params.beta)
        hs = h.sum(-1, keepdim=True)
        if ids is None:
            dz = h - (z_s - lse_s[:, None]).exp() * hs
        elif params.add_tail:
            p_s = (z_s - lse_s[:, None]).exp()
            q_tail = lq_s[:, -1:].exp()
            per_tail = torch.where(q_tail > 0, h[:, -1:] / q_tail, 0.0)  # the tail's h in proportion to p_S
            dz = p_s * (per_tail - hs)
            dz.scatter_(-1, ids, h[:, :-1] - p_s.gather(-1, ids) * hs)
        else:
            dz = torch.zeros_like(z_s)
            dz.scatter_(-1, ids, h - lq_s.exp() * hs)
        g = torch.where(valid, grad[sl].float(), 0.0) / params.temperature
        out[sl] = torch.where(valid[:, None], dz * g[:, None], 0.0).to(out.dtype)
    return out.reshape(student.shape)
