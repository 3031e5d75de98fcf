"""Torch references for the kernels (also the path used for training: it has autograd)."""
from __future__ import annotations

from torch import Tensor

from elastilab import spec
from elastilab.spec import MLPWeights


def routed_mlp_residual_reference(x: Tensor, h: Tensor, idx: Tensor, w: MLPWeights, gate: Tensor | None = None) -> Tensor:
    """out = x, except out[idx] = x[idx] + gate[:, None] * mlp(h[idx]) (mlp includes b_out)."""
    y = spec.mlp_forward(w, h[idx])
    if gate is not None:
        y = gate[:, None].to(y.dtype) * y
    return x.index_add(0, idx, y.to(x.dtype))


# kernel 2's reference is spec.mlp_experts_forward itself
expert_mlp_reference = spec.mlp_experts_forward
