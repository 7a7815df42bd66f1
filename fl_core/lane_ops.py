"""Layers written over a leading lane (client) dimension, so one computation can train several clients.

`torch.func.vmap` cannot batch `aten::lstm`, and PyTorch's CPU LSTM backward accumulates the
weight gradients one time step at a time. The projected LSTM (nn.LSTM with proj_size) is
therefore written here with a hand-written backward: the input projection is one matmul
over the whole sequence, each time step is one batched matmul per direction for every lane,
everything that does not depend on the recurrence (activation derivatives, masks) is
computed for all steps at once, and the weight gradients are two batched matmuls over the
whole sequence. The two time loops are TorchScript, so they run without Python (and without
holding the GIL while other client threads work).

Rows may pack several sequences one after another: `keep` is 0 where a new sequence starts,
which resets (h, c) before that step. Gate order and math are nn.LSTM's:
i, f, g, o; c' = f c + i g; h' = W_hr (o tanh c').
"""

from __future__ import annotations

import warnings
from typing import List

import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TorchScript's deprecation notice: it is still the GIL-free loop we need

    @torch.jit.script
    def _forward_loop(gx: torch.Tensor, keep: torch.Tensor, resets: List[bool], whh_t: torch.Tensor,
                      whr_t: torch.Tensor):
        # time-major: gx (T, L, R, 4H) with both biases, overwritten by the gate activations; keep (T, L, R, 1);
        # resets[t]: whether any row starts a new sequence at t; whh_t (L, P, 4H); whr_t (L, H, P)
        T, L, R, G = gx.shape
        H = G // 4
        P = whr_t.shape[2]
        cs = torch.empty(T, L, R, H, dtype=gx.dtype)
        tcs = torch.empty(T, L, R, H, dtype=gx.dtype)
        ms = torch.empty(T, L, R, H, dtype=gx.dtype)
        hs = torch.empty(T, L, R, P, dtype=gx.dtype)
        h = torch.zeros(L, R, P, dtype=gx.dtype)
        c = torch.zeros(L, R, H, dtype=gx.dtype)
        for t in range(T):
            if resets[t]:
                h = h * keep[t]
                c = c * keep[t]
            a = gx[t]
            a.baddbmm_(h, whh_t)
            a[:, :, : 2 * H].sigmoid_()
            a[:, :, 2 * H: 3 * H].tanh_()
            a[:, :, 3 * H:].sigmoid_()
            c = torch.addcmul(a[:, :, H: 2 * H] * c, a[:, :, :H], a[:, :, 2 * H: 3 * H], out=cs[t])
            torch.tanh(c, out=tcs[t])
            torch.mul(a[:, :, 3 * H:], tcs[t], out=ms[t])
            h = torch.bmm(ms[t], whr_t, out=hs[t])
        return hs, gx, cs, tcs, ms

    @torch.jit.script
    def _backward_loop(dhs: torch.Tensor, keep: torch.Tensor, resets: List[bool], whh: torch.Tensor, whr: torch.Tensor,
                       pc: torch.Tensor, po: torch.Tensor, a_c: torch.Tensor, f_k: torch.Tensor):
        # pc (T, L, R, 3, H): what dc multiplies for the i, f, g pre-activations; po (T, L, R, H) for o;
        # a_c = o (1 - tanh(c)^2); f_k = f * keep (how dc flows back to the previous cell)
        T, L, R, P = dhs.shape
        H = po.shape[3]
        dgates = torch.empty(T, L, R, 4 * H, dtype=dhs.dtype)
        dh_all = torch.empty(T, L, R, P, dtype=dhs.dtype)
        dh = torch.zeros(L, R, P, dtype=dhs.dtype)
        dc = torch.zeros(L, R, H, dtype=dhs.dtype)
        for s in range(T):
            t = T - 1 - s
            dh = torch.add(dh, dhs[t], out=dh_all[t])
            dm = torch.bmm(dh, whr)
            dc = torch.addcmul(dc, dm, a_c[t])
            dg = dgates[t]
            torch.mul(dc.unsqueeze(2), pc[t], out=dg[:, :, : 3 * H].view(L, R, 3, H))
            torch.mul(dm, po[t], out=dg[:, :, 3 * H:])
            dc = dc * f_k[t]
            dh = torch.bmm(dg, whh)
            if resets[t]:
                dh = dh * keep[t]
        return dgates, dh_all


class _LaneLSTM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gx: torch.Tensor, keep: torch.Tensor, whh_t: torch.Tensor, whr_t: torch.Tensor) -> torch.Tensor:
        resets = (keep == 0).flatten(1).any(1).tolist()
        hs, acts, cs, tcs, ms = _forward_loop(gx, keep, resets, whh_t.contiguous(), whr_t.contiguous())
        ctx.resets = resets
        ctx.save_for_backward(keep, whh_t, whr_t, hs, acts, cs, tcs, ms)
        return hs

    @staticmethod
    def backward(ctx, dhs: torch.Tensor):
        keep, whh_t, whr_t, hs, acts, cs, tcs, ms = ctx.saved_tensors
        T, L, R, G = acts.shape
        H = G // 4
        i, f, g, o = acts[..., :H], acts[..., H:2 * H], acts[..., 2 * H:3 * H], acts[..., 3 * H:]
        # everything that does not depend on the recurrence, for all steps at once
        cprev = torch.cat([torch.zeros_like(cs[:1]), cs[:-1]]) * keep
        pc = torch.stack([g * i * (1 - i), cprev * f * (1 - f), i * (1 - g * g)], dim=3)
        po = tcs * o * (1 - o)
        a_c = o * (1 - tcs * tcs)
        f_k = f * keep
        dgates, dh_all = _backward_loop(dhs.contiguous(), keep, ctx.resets, whh_t.transpose(1, 2).contiguous(),
                                        whr_t.transpose(1, 2).contiguous(), pc, po, a_c, f_k)
        hin = torch.cat([torch.zeros_like(hs[:1]), hs[:-1]]) * keep
        lanes = lambda z: z.permute(1, 0, 2, 3).reshape(L, T * R, z.shape[-1])  # noqa: E731
        d_whh_t = torch.bmm(lanes(hin).transpose(1, 2), lanes(dgates))
        d_whr_t = torch.bmm(lanes(ms).transpose(1, 2), lanes(dh_all))
        return dgates, None, d_whh_t, d_whr_t


def lane_lstm(x: torch.Tensor, keep: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor,
              b_hh: torch.Tensor, w_hr: torch.Tensor) -> torch.Tensor:
    """A projected one-layer LSTM per lane: x (L, T, R, in) -> outputs (L, T, R, proj); weights (L, *nn.LSTM shape).

    keep (L, T, R) is 0 where a new sequence starts in a row (the state is reset before that step).
    """
    L, T, R, D = x.shape
    bias = (b_ih + b_hh).unsqueeze(1)
    gx = torch.baddbmm(bias, x.reshape(L, T * R, D), w_ih.transpose(1, 2)).view(L, T, R, -1)
    gx = gx.permute(1, 0, 2, 3).contiguous()  # time-major (each step's slice contiguous); a fresh buffer we may overwrite
    keep_t = keep.to(x.dtype).permute(1, 0, 2).unsqueeze(-1).contiguous()
    hs = _LaneLSTM.apply(gx, keep_t, w_hh.transpose(1, 2), w_hr.transpose(1, 2))
    return hs.permute(1, 0, 2, 3)
