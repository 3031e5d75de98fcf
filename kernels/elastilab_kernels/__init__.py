"""Triton kernels for routed MLPs (forward only). Use ``ops.routed_mlp_residual`` / ``ops.expert_mlp``.

The kernel module itself (``mlp_triton``) is imported on first Triton use, so set
``TRITON_INTERPRET=1`` before that to run the kernels on CPU. Launch count: ``ops.LAUNCHES``.
"""
from . import ops
from .ops import expert_mlp, routed_mlp_residual
from .reference import routed_mlp_residual_reference

__all__ = ["ops", "routed_mlp_residual", "expert_mlp", "routed_mlp_residual_reference"]
