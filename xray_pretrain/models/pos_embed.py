"""Fixed 2-D sine-cosine positional embeddings for any (non-square) patch grid.

Convention (identical to MAE's ``get_2d_sincos_pos_embed`` on square grids, so MAE checkpoints keep
their meaning): tokens are row-major over the grid (row = h outer, column = w inner); the first half
of the channels encodes the column index, the second half the row index; each half is
``[sin(pos * omega), cos(pos * omega)]`` with ``omega_i = 10000 ** (-i / (D/4))``.

Because the embedding is a fixed function of the grid, "interpolating" it to a new image size is
exact recomputation: every token gets the embedding of its integer grid position on the new grid.
"""

from __future__ import annotations

import torch


def sincos_1d(dim: int, positions_M: torch.Tensor) -> torch.Tensor:
    """(M,) float positions -> (M, dim) embedding ``[sin | cos]``; ``dim`` must be even."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega_F = torch.arange(dim // 2, dtype=torch.float64, device=positions_M.device) / (dim / 2.0)
    omega_F = 1.0 / (10000.0**omega_F)
    angles_MF = positions_M.to(torch.float64)[:, None] * omega_F[None, :]
    return torch.cat([angles_MF.sin(), angles_MF.cos()], dim=1)


def sincos_2d(dim: int, grid_size: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Embedding table for a ``grid_size = (rows, cols)`` patch grid.

    Returns float32 ``(1 + rows*cols, dim)`` when ``cls_token`` (row 0 is the zero cls slot, as in
    MAE and timm's layout), else ``(rows*cols, dim)``. ``dim`` must be divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    num_rows, num_cols = grid_size
    # Computed on the CPU in float64 and cast once: the table is a constant, and building it on the
    # meta device (parameter counting) must not need real values.
    rows_L = torch.arange(num_rows, dtype=torch.float64, device="cpu").repeat_interleave(num_cols)
    cols_L = torch.arange(num_cols, dtype=torch.float64, device="cpu").repeat(num_rows)
    table_LD = torch.cat([sincos_1d(dim // 2, cols_L), sincos_1d(dim // 2, rows_L)], dim=1)
    if cls_token:
        table_LD = torch.cat([torch.zeros(1, dim, dtype=torch.float64, device="cpu"), table_LD], dim=0)
    return table_LD.float()


def sincos_buffer(
    dim: int, grid_size: tuple[int, int], device: torch.device, replaces: torch.Tensor | None
) -> torch.Tensor:
    """``(1, 1 + rows*cols, dim)`` table (zero cls slot first) on ``device``, for a module buffer.

    Takes the dtype of the table it ``replaces`` (a model cast to bf16 stays bf16 end to end), float32
    for the first one.
    """
    dtype = replaces.dtype if replaces is not None else torch.float32
    return sincos_2d(dim, grid_size).unsqueeze(0).to(device=device, dtype=dtype)
