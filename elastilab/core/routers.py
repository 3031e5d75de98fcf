"""The tiny routers: one Linear per layer and component, the only weights ElastiFormer trains."""
from __future__ import annotations

import torch
from torch import Tensor, nn

N_QUANTILES = 101  # calibration table: score quantiles at 0%, 1%, ..., 100%


class Router(nn.Module):
    """Scores rows of a hidden state: Linear(d, 1) for tokens, Linear(d, H) heads, Linear(d, E) experts.

    Token routers also hold a table of score quantiles measured on calibration text, from which the
    threshold for any capacity is read (threshold mode); it is NaN until ``calibrate`` fills it.
    """

    def __init__(self, d: int, n_out: int = 1):
        super().__init__()
        self.proj = nn.Linear(d, n_out)
        if n_out == 1:
            self.register_buffer("quantiles", torch.full((N_QUANTILES,), float("nan")))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Fresh initial weights and an empty calibration table, drawn from ``generator`` (on its
        device: reproducible whatever the global RNG state) or else from the global RNG."""
        w = self.proj.weight
        device = w.device if generator is None else generator.device
        w.copy_(torch.empty(w.shape, dtype=w.dtype, device=device).normal_(std=w.shape[1] ** -0.5 * 0.1,
                                                                           generator=generator))
        self.proj.bias.zero_()
        if hasattr(self, "quantiles"):
            self.quantiles.fill_(float("nan"))

    def forward(self, h: Tensor) -> Tensor:
        s = self.proj(h.to(self.proj.weight.dtype))
        return s.squeeze(-1) if s.shape[-1] == 1 else s

    @property
    def calibrated(self) -> bool:
        return hasattr(self, "quantiles") and not bool(torch.isnan(self.quantiles).any())

    def threshold(self, capacity: float) -> float:
        """Score above which a fraction ``capacity`` of calibration tokens fell."""
        q = (1.0 - capacity) * (N_QUANTILES - 1)
        lo = int(q)
        hi = min(lo + 1, N_QUANTILES - 1)
        t = self.quantiles
        return float(t[lo] + (q - lo) * (t[hi] - t[lo]))

    def set_quantiles(self, scores: Tensor) -> None:
        probs = torch.linspace(0, 1, N_QUANTILES, device=scores.device)
        self.quantiles.copy_(torch.quantile(scores.float().flatten(), probs))
