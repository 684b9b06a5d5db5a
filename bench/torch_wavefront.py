"""PyTorch autograd baseline: a 2D MD-LSTM that computes one anti-diagonal per step.

Same equations and gate order as :class:`mdnumba.MDLSTM2D` (``mdnumba/reference.py``)::

    a = W x + U_up h_up + U_left h_left + b,   a = [a_i | a_fu | a_fl | a_o | a_g]
    c = σ(a_i)·tanh(a_g) + σ(a_fu)·c_up + σ(a_fl)·c_left,   h = σ(a_o)·tanh(c)

Layout: the input projection ``W x + b`` for every cell is one GEMM, then the
cells are gathered into skewed (per-anti-diagonal) order. Diagonal ``k`` holds
rows ``i = lo_k .. hi_k`` (``j = k - i``) as a ``(n_k, B, D)`` tensor. Both
parents of row ``i`` lie on diagonal ``k-1``: *up* at row ``i-1``, *left* at row
``i``. Padding diagonal ``k-1`` with one zero row on each side makes both a
plain slice, so one diagonal is one ``(B·n_k, 2D) @ (2D, 5D)`` GEMM plus
elementwise ops — the strongest simple formulation in eager PyTorch. No
in-place updates, so autograd differentiates it as is.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports (torch may be missing)
    raise SystemExit("bench/torch_wavefront.py is a module of bench_cpu.py and bench_gpu.py, not a script: "
                     "run that")

import numpy as np
import torch


def diagonal_rows(H: int, W: int) -> list[tuple[int, int]]:
    """``[(lo_k, hi_k)]``: the first and last row index on each anti-diagonal k."""
    return [(max(0, k - W + 1), min(k, H - 1)) for k in range(H + W - 1)]


def skew_permutation(H: int, W: int) -> np.ndarray:
    """Row-major flat index of every cell, in skewed order (diagonal by diagonal, row by row)."""
    return np.array([i * W + (k - i) for k, (lo, hi) in enumerate(diagonal_rows(H, W))
                     for i in range(lo, hi + 1)], dtype=np.int64)


class TorchMDLSTM2D(torch.nn.Module):
    """2D MD-LSTM, top-left → bottom-right scan, parameters ``W (C, 5D)``,
    ``U (2D, 5D) = [U_up; U_left]`` and ``b (5D,)``; ``forward`` maps
    ``(B, H, W, C)`` to ``(B, H, W, D)``."""

    def __init__(self, in_channels: int, hidden: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        C, D = in_channels, hidden
        self.hidden = D
        self.W = torch.nn.Parameter(torch.zeros(C, 5 * D, dtype=dtype))
        self.U = torch.nn.Parameter(torch.zeros(2 * D, 5 * D, dtype=dtype))
        self.b = torch.nn.Parameter(torch.zeros(5 * D, dtype=dtype))
        self._perm_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def load_from_mdnumba(self, layer) -> None:
        """Copy the parameters of an :class:`mdnumba.MDLSTM2D` into this module."""
        p = layer.params
        self.W.copy_(torch.from_numpy(np.array(p["W"])))
        self.U.copy_(torch.from_numpy(np.concatenate([p["U_up"], p["U_left"]], axis=0)))
        self.b.copy_(torch.from_numpy(np.array(p["b"])))

    def _perms(self, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached (skew, unskew) index tensors of an H x W grid."""
        key = (H, W)
        if key not in self._perm_cache:
            perm = skew_permutation(H, W)
            inv = np.empty_like(perm)
            inv[perm] = np.arange(perm.size)
            self._perm_cache[key] = (torch.from_numpy(perm), torch.from_numpy(inv))
        return self._perm_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``h`` of shape (B, H, W, D) for ``x`` of shape (B, H, W, C)."""
        B, H, W, C = x.shape
        D = self.hidden
        perm, inv = self._perms(H, W)
        xs = x.reshape(B, H * W, C)[:, perm].transpose(0, 1).reshape(H * W * B, C)
        proj = torch.addmm(self.b, xs, self.W)  # (cells*B, 5D), skewed cell-major rows
        rows = diagonal_rows(H, W)
        # one split (a single autograd node) instead of a slice per diagonal: the backward
        # of every slice would zero-fill a gradient of the whole projection
        chunks = torch.split(proj, [(hi - lo + 1) * B for lo, hi in rows])
        zero = x.new_zeros(1, B, D)
        hs: list[torch.Tensor] = []
        h_prev = c_prev = x.new_zeros(0, B, D)
        lo_prev = 0
        for (lo, hi), pre in zip(rows, chunks):
            n = hi - lo + 1
            off = lo - lo_prev  # padded diagonal k-1 starts at row lo_prev - 1
            h_pad = torch.cat([zero, h_prev, zero])
            c_pad = torch.cat([zero, c_prev, zero])
            h_par = torch.cat([h_pad[off:off + n], h_pad[off + 1:off + 1 + n]], dim=2)
            a = torch.addmm(pre, h_par.reshape(n * B, 2 * D), self.U).reshape(n, B, 5 * D)
            a_sig, a_g = a.split([4 * D, D], dim=2)
            gi, gfu, gfl, go = torch.sigmoid(a_sig).split(D, dim=2)
            c = (gi * torch.tanh(a_g) + gfu * c_pad[off:off + n]
                 + gfl * c_pad[off + 1:off + 1 + n])
            h = go * torch.tanh(c)
            hs.append(h)
            h_prev, c_prev, lo_prev = h, c, lo
        return torch.cat(hs)[inv].permute(1, 0, 2).reshape(B, H, W, D)
