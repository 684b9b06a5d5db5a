"""PyTorch autograd baseline for the N-D MD-LSTM family: any N, 1 or 2**N directions.

Same equations, gate order and parameter layout as :class:`mdnumba.WavefrontLSTM`
with ``cell="graves"`` (``W (S, C, G)``, ``U (S, D, N, G)``, ``b (S, G)``,
``G = (N+3)*D``, direction q reverses the axes of q's set bits; outputs
concatenated). Eager PyTorch, one hyperplane ``i_1 + .. + i_N = k`` per step, the
S directions batched on a leading axis (the directions run together, as in
mdnumba): the input projection of every cell is one batched GEMM; per plane, the
parents are gathered from the previous plane with an index tensor (a zero row
stands for an absent parent) and ``Σ_d h_d U_d`` is one batched matmul. No in-place
updates, so autograd differentiates it as is.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports (torch may be missing)
    raise SystemExit("bench/torch_wavefront_nd.py is a module of bench_family.py, not a script: "
                     "run that")

import numpy as np
import torch

from mdnumba.grid import wavefront


class TorchWavefrontLSTM(torch.nn.Module):
    """N-D graves MD-LSTM over ``(B, n_1, .., n_N, C)`` with ``directions`` scans."""

    def __init__(self, ndim: int, in_channels: int, hidden: int, directions: int = 1,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        N, C, D, S = ndim, in_channels, hidden, directions
        G = (N + 3) * D
        self.ndim, self.hidden, self.directions = N, D, S
        self.W = torch.nn.Parameter(torch.zeros(S, C, G, dtype=dtype))
        self.U = torch.nn.Parameter(torch.zeros(S, D, N, G, dtype=dtype))
        self.b = torch.nn.Parameter(torch.zeros(S, G, dtype=dtype))
        self._tables: dict[tuple, tuple] = {}

    @torch.no_grad()
    def load_from_mdnumba(self, layer) -> None:
        """Copy the parameters of an ``mdnumba.WavefrontLSTM`` (graves cell) into this module."""
        S = self.directions
        for name in ("W", "U", "b"):
            arr = np.array(layer.params[name]).reshape(getattr(self, name).shape if S > 1 else
                                                        (1,) + layer.params[name].shape)
            getattr(self, name).copy_(torch.from_numpy(arr))

    def _plane_tables(self, dims: tuple, device):
        """Skew permutation, inverse, and per plane: cell count and parent gather indices (one
        index row per dimension), on ``device``: CPU index tensors into CUDA data would be copied
        to the GPU, with a stream sync, at every use (2N per plane and pass)."""
        key = (dims, str(device))
        if key not in self._tables:
            wf = wavefront(dims)
            planes = []
            for k in range(wf.n_diagonals):
                lo, hi = int(wf.diag_off[k]), int(wf.diag_off[k + 1])
                plo = int(wf.diag_off[k - 1]) if k else lo
                n_prev = lo - plo
                par = wf.parent[lo:hi]
                idx = np.where(par >= 0, par - plo, n_prev)  # n_prev = the zero row
                planes.append((hi - lo, [torch.from_numpy(row.copy()).to(device) for row in idx.T]))
            self._tables[key] = (torch.from_numpy(np.array(wf.perm)).to(device),
                                 torch.from_numpy(np.array(wf.inv_perm)).to(device), planes)
        return self._tables[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``h`` of shape (B, *dims, S*D) for ``x`` of shape (B, *dims, C)."""
        B, dims, C = x.shape[0], tuple(x.shape[1:-1]), x.shape[-1]
        N, D, S = self.ndim, self.hidden, self.directions
        perm, inv, planes = self._plane_tables(dims, x.device)
        flips = [tuple(1 + d for d in range(N) if (q >> d) & 1) for q in range(S)]
        xq = torch.stack([x.flip(f) if f else x for f in flips])            # (S, B, *dims, C)
        xs = xq.reshape(S, B, -1, C)[:, :, perm]                             # (S, B, M, C) skewed
        proj = torch.baddbmm(self.b[:, None], xs.reshape(S, -1, C), self.W)  # (S, B*M, G)
        proj = proj.reshape(S, B, -1, proj.shape[-1])
        chunks = torch.split(proj, [n for n, _ in planes], dim=2)
        Ucat = self.U.reshape(S, D * N, -1)
        zero = x.new_zeros(S, B, 1, D)
        h_prev = c_prev = x.new_zeros(S, B, 0, D)
        hs = []
        for (n, idx), pre in zip(planes, chunks):
            h_pad, c_pad = torch.cat([h_prev, zero], dim=2), torch.cat([c_prev, zero], dim=2)
            h_par = torch.stack([h_pad[:, :, i] for i in idx], dim=-1)      # (S, B, n, D, N)
            a = pre + torch.bmm(h_par.reshape(S, B * n, D * N), Ucat).reshape(S, B, n, -1)
            gi, gf, go, gg = a.split([D, N * D, D, D], dim=-1)
            gf = torch.sigmoid(gf).reshape(S, B, n, N, D)
            c_par = torch.stack([c_pad[:, :, i] for i in idx], dim=3)      # (S, B, n, N, D)
            c = torch.sigmoid(gi) * torch.tanh(gg) + (gf * c_par).sum(dim=3)
            h = torch.sigmoid(go) * torch.tanh(c)
            hs.append(h)
            h_prev, c_prev = h, c
        h = torch.cat(hs, dim=2)[:, :, inv].reshape((S, B) + dims + (D,))
        outs = [h[q].flip(f) if f else h[q] for q, f in enumerate(flips)]
        return torch.cat(outs, dim=-1)
