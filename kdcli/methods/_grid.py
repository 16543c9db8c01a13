"""Grid cells over a feature map, for methods that pool or rank per region (SAMKD's spatial pyramid).

A g×g grid on an H×W map is clamped to the map (at most one cell per position) and splits it like
adaptive pooling when g divides the size; :class:`Pyramid` numbers the cells of several grids
consecutively so that one ranking or one matmul covers every grid at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cell_index(h: int, w: int, g: int, device: torch.device | None = None) -> tuple[Tensor, int]:
    """Cell id (H·W,) of every position for a g×g grid clamped to the map, and the number of cells."""
    gh, gw = min(g, h), min(g, w)
    rows = torch.arange(h, device=device) * gh // h
    cols = torch.arange(w, device=device) * gw // w
    return (rows.view(h, 1) * gw + cols.view(1, w)).flatten(), gh * gw


def cell_mean(x: Tensor, cell: Tensor, num_cells: int) -> Tensor:
    """Mean of x (N, C, P) over the positions of each cell → (N, C, G)."""
    onehot = F.one_hot(cell, num_cells).to(x.dtype)  # (P, G)
    return (x @ onehot) / onehot.sum(0).clamp_min(1)


class Pyramid:
    """The cells of every grid of a pyramid on an H×W map, numbered consecutively across the grids.

    ``group`` (G·P,) holds, grid after grid, the cell id of every position offset by the cell count of
    the grids before it, so that one ranking call with ``group`` ranks every cell of every grid at
    once, and one matmul with the (P, Σ cells) ``indicator`` gives every cell mean. Built once per
    (H, W, grids, device) and cached by the method (a few kB per map size at the shapes size).
    """

    def __init__(self, h: int, w: int, grids: tuple[int, ...], device: torch.device) -> None:
        ids: list[Tensor] = []
        counts: list[int] = []
        offset = 0
        for g in grids:
            cell, n = cell_index(h, w, g, device)
            ids.append(cell + offset)
            counts.append(n)
            offset += n
        self.counts = tuple(counts)
        self.total = offset
        self.group = torch.cat(ids)  # (G·P,) global cell id of (grid, position)
        self.indicator = F.one_hot(self.group, offset).view(len(grids), h * w, offset).sum(0)  # (P, Σ cells)
        self.size = self.indicator.sum(0).clamp_min(1)  # positions per cell
        self._float: dict[torch.dtype, tuple[Tensor, Tensor]] = {}

    def cell_means(self, x: Tensor) -> Tensor:
        """Mean of x (N, C, P) over every cell of every grid → (N, C, Σ cells) (== :func:`cell_mean` per grid)."""
        if x.dtype not in self._float:  # the indicator in x's dtype, converted once, not at every call
            self._float[x.dtype] = (self.indicator.to(x.dtype), self.size.to(x.dtype))
        indicator, size = self._float[x.dtype]
        return (x @ indicator) / size


__all__ = ["Pyramid", "cell_index", "cell_mean"]
