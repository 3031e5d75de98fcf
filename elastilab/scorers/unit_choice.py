"""Cheaper choosing of single MLP units (issue 18): a low-rank predictor of the gate picks the units
before the gate projection is computed, so the MLP pays for the predictor instead of the whole gate
(a third of a SwiGLU MLP). Both scorers hand the MLP a ``UnitPlan`` (``elastilab.unit_plan``).

==================== =====================================================================================
lowrank_gate         predictor only: top-k units by |act(B A h)| x ||w_out column||; the MLP then computes
                     the gate, up and down projections of those units only
two_stage            the predictor picks ceil(candidates x k) candidates; their exact hidden values
                     act(gate) x up are computed (only theirs), and the final k are the candidates with the
                     largest |hidden| x ||w_out column|| (the unit oracle's criterion); the MLP then runs
                     only the down projection
==================== =====================================================================================

The predictor: a rank-r factorisation B A ~ W of the gate's weights (w_gate; w_in for GELU MLPs). Without
calibration, the truncated SVD of W (weights only, no data). After ``fit_unit_predictors(em, inputs)``, the
factorisation that is best *on those inputs' MLP inputs* (W whitened by their second moment, then truncated:
min E||W h - B A h||^2 over the calibration rows). Its 2 r (d + F) FLOPs per row, and the two-stage
candidates' projections, are counted scoring work. Per row (token), so causal and usable with a KV cache.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from elastilab.core.routing import n_kept
from elastilab.core.spec import ACTIVATIONS
from elastilab.core.unit_plan import UnitPlan, exact_hidden, pre_gate_weights
from elastilab.scorers.base import KINDS, Candidates, Scorer, register

#: just below 1: mlp_units runs routed (so the predictors' inputs pass the MLP) but keeps every unit
_ALL_KEPT = 1.0 - 1e-7


def _rank(requested: int, w) -> int:
    """At most a quarter of min(d, F): a predictor near full rank would cost what the gate does."""
    d, width = w.w_in.shape[1], w.width
    return max(1, min(requested, min(d, width) // 4))


def lowrank_factors(W: Tensor, rank: int, second_moment: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(A [r, d], B [F, r]) with B A the best rank-r approximation of W [F, d]: in Frobenius norm
    (second_moment None), or in E||W h - B A h||^2 for rows h of that second moment E[h h^T] [d, d]."""
    W = W.detach().double()
    if second_moment is None:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return Vh[:rank].float(), (U[:, :rank] * S[:rank]).float()
    C = second_moment.double()
    C = C + 1e-6 * C.diagonal().mean() * torch.eye(len(C), dtype=C.dtype, device=C.device)  # rank-deficient rows
    L = torch.linalg.cholesky(C)                       # E||W h - B A h||^2 = ||(W - B A) L||_F^2
    U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
    A = torch.linalg.solve_triangular(L.T, Vh[:rank].T, upper=True).T  # Vh_r L^-1
    return A.float(), (U[:, :rank] * S[:rank]).float()


def _key(w) -> tuple:
    wg = pre_gate_weights(w)[0]
    return wg.data_ptr(), wg._version, tuple(wg.shape)


class _Predictor:
    """A block's predictor: factors A, B (float32, as fitted), the norms of w_out's columns, and copies in
    the dtype and device last used (made once, outside the FLOP counter's view of matmuls)."""

    def __init__(self, key, A: Tensor, B: Tensor, fitted: bool, r2: float | None = None):
        self.key, self.A, self.B, self.fitted, self.r2 = key, A, B, fitted, r2
        self._cast: dict = {}

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def cast(self, w, ls2, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        at = (like.dtype, like.device)
        if at not in self._cast:
            w_out = w.w_out.detach().t().float()
            norms = (w_out if ls2 is None else w_out * ls2.detach().float()).norm(dim=-1)
            self._cast = {at: tuple(t.to(device=like.device, dtype=like.dtype) for t in (self.A, self.B, norms))}
        return self._cast[at]


def predictor(block, rank: int = 64) -> _Predictor:
    """The block's unit predictor: the one ``fit_unit_predictors`` fitted, else the weights' truncated SVD
    (made once per weight version and rank)."""
    w = block._spec().mlp
    key, r = _key(w), _rank(rank, w)
    p = getattr(block, "unit_predictor", None)
    if p is not None and p.fitted:
        if p.key != key:
            raise ValueError(f"layer {block.layer_idx}: the MLP weights changed since fit_unit_predictors; fit again")
        return p
    if p is None or p.key != key or p.rank != r:
        p = block.unit_predictor = _Predictor(key, *lowrank_factors(pre_gate_weights(w)[0], r), fitted=False)
    return p


@torch.no_grad()
def fit_unit_predictors(em, inputs: Tensor, rank: int = 64, batch_size: int = 4) -> dict:
    """Fit each block's gate predictor on calibration inputs (token ids [N, T], or pixel values; never the
    data a frontier reports): the rank-r factorisation of the gate's weights that is best on the MLP inputs
    these rows produce in the dense model. The scorers ``lowrank_gate`` and ``two_stage`` use it from then
    on. Returns {"rank": r, "r2": R^2 of the predicted gate pre-activations, averaged over layers}."""
    if not torch.is_tensor(inputs) or inputs.dim() < 2 or len(inputs) == 0:
        raise ValueError("inputs must be a non-empty batch tensor: token ids [N, T] or pixel values [N, C, H, W]")
    if "mlp_units" not in em.capacities:
        raise ValueError(f"fit_unit_predictors needs mlp_units elastic; elastic here: {', '.join(em.capacities)}")
    moments: dict = {}

    def record(block, args):  # RoutedMLP(w, h, ...): the block's MLP input rows
        h = args[1].detach().reshape(-1, args[1].shape[-1]).double()
        s, n = moments.get(block.layer_idx, (0, 0))
        moments[block.layer_idx] = (s + h.T @ h, n + len(h))

    hooks = [b.mlp.register_forward_pre_hook(lambda m, args, b=b: record(b, args)) for b in em.blocks]
    try:
        with em.capacity(**{c: 1.0 for c in em.capacities}):
            for chunk in inputs.split(batch_size):
                chunk = chunk.to(em.device)
                em(chunk) if inputs.dtype == torch.long else em(pixel_values=chunk)
    finally:
        for hk in hooks:
            hk.remove()
    r2s, r = [], None
    for b in em.blocks:
        w = b._spec().mlp
        s, n = moments[b.layer_idx]
        C, W = s / n, pre_gate_weights(w)[0].detach().double()
        r = _rank(rank, w)
        A, B = lowrank_factors(W, r, C)
        E = W - B.double() @ A.double()
        r2 = 1.0 - float(torch.trace(E @ C @ E.T) / torch.trace(W @ C @ W.T).clamp_min(1e-30))
        b.unit_predictor = _Predictor(_key(w), A, B, fitted=True, r2=r2)
        r2s.append(r2)
    return {"rank": r, "r2": sum(r2s) / len(r2s)}


def clear_unit_predictors(em) -> None:
    """Forget fitted predictors (the scorers fall back to the weights' SVD)."""
    for b in em.blocks:
        b.unit_predictor = None


@register
class LowRankGate(Scorer):
    """mlp_units by a rank-r predictor of the gate, before any of the MLP runs (see the module)."""

    name = "lowrank_gate"
    components = ("mlp_units",)
    kinds = KINDS

    def __init__(self, rank: int = 64):
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = rank

    def check(self, em, component):
        super().check(em, component)
        with torch.no_grad():
            for b in em.blocks:  # make the factors now, not inside a measured forward
                predictor(b, self.rank)

    def _predict(self, c: Candidates) -> tuple[Tensor, Tensor, int, int]:
        """(predicted |hidden| x ||w_out|| [n, F], w_out norms, units to keep k, predictor FLOPs)."""
        spec = c.spec
        w, h = spec.mlp, c.h
        p = predictor(c.block, self.rank)
        A, B, norms = p.cast(w, spec.ls2, h)
        z = F.linear(F.linear(h, A), B)               # 2 n r (d + F) FLOPs: counted scoring work
        bias = pre_gate_weights(w)[1]
        if bias is not None:
            z = z + bias
        k = n_kept(c.block.capacity["mlp_units"], w.width)
        return ACTIVATIONS[w.act](z).abs() * norms, norms, k, 2 * h.shape[0] * p.rank * (h.shape[1] + w.width)

    def __call__(self, c):
        score, _, k, flops = self._predict(c)
        return UnitPlan(score.topk(k, -1, sorted=False).indices, None, flops)


@register
class TwoStage(LowRankGate):
    """mlp_units in two stages: the predictor's top candidates, then the exact |hidden| x ||w_out|| among
    them (see the module). ``candidates``: candidates per kept unit (at most every unit); 2 was the best of
    1.25, 1.5 and 2 at whole-model compute 0.85 on calibration text (SmolLM2-135M, licenses train split)."""

    name = "two_stage"

    def __init__(self, rank: int = 64, candidates: float = 2.0):
        super().__init__(rank)
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1 (candidates per kept unit), got {candidates}")
        self.candidates = candidates

    def __call__(self, c):
        score, norms, k, flops = self._predict(c)
        w, h = c.spec.mlp, c.h
        m = min(w.width, math.ceil(self.candidates * k - 1e-9))
        cand = score.topk(m, -1, sorted=False).indices.sort(-1).values
        hidden = exact_hidden(w, h, cand)              # only the candidates' gate (and up) rows
        flops += 2 * h.shape[0] * m * h.shape[1] * (2 if w.kind == "swiglu" else 1)
        top = (hidden.abs() * norms[cand]).topk(k, -1, sorted=False).indices
        return UnitPlan(cand.gather(1, top), hidden.gather(1, top), flops)
