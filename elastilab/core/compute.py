"""FLOPs per component: counted analytically from what each block chose, and measured on the real
routed forward with ``torch.utils.flop_counter`` (which counts matmuls and attention, not norms or
element-wise ops). A matmul of [m, k] x [k, n] is 2*m*k*n FLOPs in both counts.

A LoRA (``elastilab.core.lora``) counts nothing: at inference it is merged into the weights once (W + ΔW,
cached), so the routed path runs the same matmuls as without it."""
from __future__ import annotations

from math import prod

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count

from elastilab.core.components import in_sublayer

_aten = torch.ops.aten


def _attn_flops(q_shape, k_shape, v_shape) -> int:
    b, h, t, d = q_shape
    s, dv = k_shape[-2], v_shape[-1]
    return 2 * b * h * t * s * d + 2 * b * h * t * s * dv  # scores, then weights @ values


# torch's counter knows the CUDA attention kernels but not the CPU one, nor GQA (fewer kv heads)
if not getattr(_aten._scaled_dot_product_flash_attention_for_cpu, "_elastilab_flops", False):
    @register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu)
    def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return _attn_flops(query, key, value)  # the counter passes shapes

    @register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        k = (key[0], query[1], *key[2:])
        v = (value[0], query[1], *value[2:])
        return sdpa_backward_flop_count(grad_out, query, k, v)

    # mlp_units (kernels.reference.unit_mlp_sparse): products over the nonzeros of a CSR pattern
    @register_flop_formula(_aten.sparse_sampled_addmm, get_raw=True)
    def _sampled_addmm_flops(pattern, mat1, mat2, *args, out_val=None, **kwargs) -> int:
        return 2 * pattern._nnz() * mat1.shape[1]

    @register_flop_formula(_aten._sparse_addmm, get_raw=True)
    def _sparse_addmm_flops(out, sparse, dense, *args, out_val=None, **kwargs) -> int:
        return 2 * sparse._nnz() * dense.shape[1]

    # the decode gather path (kernels.reference.gather_sum): a weighted sum of the chosen rows
    def _embedding_bag_flops(weight, indices, *args, out_shape=None, **kwargs) -> int:
        return 2 * prod(indices) * weight[1]

    for op in (_aten._embedding_bag, _aten._embedding_bag_forward_only):
        register_flop_formula(op)(_embedding_bag_flops)

    _aten._scaled_dot_product_flash_attention_for_cpu._elastilab_flops = True


def analytic_block_flops(block) -> dict[str, int]:
    """FLOPs the last forward of ``block`` needed, from the sizes it chose (valid rows only)."""
    c = block.counts
    spec = block.adapter.block_spec(block.base_layer, block.layer_idx)
    a, m = spec.attn, spec.mlp
    d, hd = a.w_q.shape[1], a.head_dim
    rows, keys = c["attn_rows"], c["keys"]
    q_rows = c.get("head_pairs", rows * a.n_heads)  # (token, head) pairs that are computed
    attn = (2 * q_rows * d * hd * 2                         # q projection and o projection
            + 2 * c.get("kv_rows", rows) * d * a.n_kv_heads * hd * 2  # k and v projections (keep_kv: every row)
            + 2 * q_rows * keys * hd * 2)                   # scores and weighted values
    n_mat = 3 if m.kind == "swiglu" else 2
    units = c["mlp_rows"] * m.width
    if "expert_pairs" in c:
        units = c["expert_pairs"] * (m.width // block.n_experts)
    mlp = 2 * units * d * n_mat
    if "unit_pairs" in c:  # the whole gate projection (and in a decode step the whole up), then the chosen units'
        whole = 2 if c.get("unit_whole_up") else 1
        mlp = 2 * units * d * whole + 2 * c["unit_pairs"] * d * (n_mat - whole)
    if "unit_mats" in c:  # a UnitPlan: no whole gate, only the chosen units' projections
        mlp = 2 * c["unit_pairs"] * d * c["unit_mats"]
    bt = c["B"] * c["T"]
    sizes = {"attn_tokens": bt, "mlp_tokens": bt, "attn_heads": c["attn_rows_padded"], "mlp_experts": c["mlp_rows"]}
    routers = sum(2 * sizes[k] * d * r.proj.out_features for k, r in block.routers.items() if block._active(k))
    if block.scoring.scorer is not None:  # another method chose: its work is only measured, unless it
        routers = c.get("scoring", 0)     # counted it (a UnitPlan's scorer)
    return {"attention": attn, "mlp": mlp, "routers": routers}


def measure_flops(em, *args, **kwargs) -> dict[str, int]:
    """Run ``em(*args, **kwargs)`` under the FLOP counter; split the count by sub-layer."""
    names = {id(m): n for n, m in em.model.named_modules()}
    prefix = type(em).__name__ + ".model."
    scorer = getattr(em, "scorer", None)
    with torch.no_grad():  # weights built once, not per token (a merged LoRA, clustered experts): before counting
        for b in em.blocks:
            b._spec()
    if scorer is not None:  # an oracle's preparation (Taylor scores) is not counted
        with torch.no_grad():
            scorer.before_forward(em, args, kwargs)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        em(*args, **kwargs)
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    out = {"attention": 0, "mlp": 0, "routers": 0, "analytic_attention": 0, "analytic_mlp": 0,
           "analytic_routers": 0, "oracle": 0, "total": counts.get("Global", 0)}
    for b in em.blocks:
        name = prefix + names[id(b)]
        out["attention"] += counts.get(name + ".attn", 0)
        out["mlp"] += counts.get(name + ".mlp", 0)
        out["routers"] += sum(v for k, v in counts.items()
                              if k.startswith(name + ".routers.") and k.count(".") == name.count(".") + 2)
        # another selection method (ElasticModel.scoring): a real method's work counts as routing
        # work; an oracle's is left out of the total (it is a ceiling for analysis, not a method)
        scoring = counts.get(name + ".scoring", 0)
        counted = b.scoring.scorer is None or b.scoring.scorer.counted
        out["routers" if counted else "oracle"] += scoring
        if not counted:
            out["total"] -= scoring
        for k, v in analytic_block_flops(b).items():
            out["analytic_" + k] += v
    return out


def compute_report(em, *args, **kwargs) -> pd.DataFrame:
    """Dense vs routed FLOPs for one input: a row per sub-layer kind and one for the whole model.

    ``dense`` is the same execution path with every capacity at 1.0 (which the invariant tests
    check equals the pretrained model); ``routed`` is measured at the current capacities."""
    with em.capacity(**{c: 1.0 for c in em.capacities}):
        dense = measure_flops(em, *args, **kwargs)
    routed = measure_flops(em, *args, **kwargs)
    caps = em.capacities
    analytic_total = (dense["total"] - dense["attention"] - dense["mlp"] + routed["analytic_attention"]
                      + routed["analytic_mlp"] + routed["analytic_routers"])
    parts = [  # (part, components, dense, routed measured, routed analytic)
        ("attention", in_sublayer("attention"), dense["attention"], routed["attention"], routed["analytic_attention"]),
        ("mlp", in_sublayer("mlp"), dense["mlp"], routed["mlp"], routed["analytic_mlp"]),
        # as a share of the dense model
        ("routers", (), dense["total"], routed["routers"], routed["analytic_routers"]),
        ("whole model", tuple(caps), dense["total"], routed["total"], analytic_total),
    ]
    return pd.DataFrame([{
        "part": part,
        "components": ", ".join(f"{c}={caps[c]:g}" for c in comps if c in caps),
        "dense_gflops": (0 if part == "routers" else d) / 1e9,
        "routed_gflops": r / 1e9,
        "analytic_gflops": a / 1e9,
        "fraction": r / d if d else float("nan"),
    } for part, comps, d, r, a in parts])
