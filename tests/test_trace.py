"""The routing trace (elastilab.core.trace): what each block records is what it computed (kept tokens =
capacity, k heads / experts per row, rows = the tokens that reached the sub-layer), for a tiny Llama and a
tiny ViT, and the readers built on it (routing maps, slot usage, router losses, calibration) give what the
readers written directly on the blocks' own records (``block.decisions``) give."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_cases import CASES

import elastilab as el
from elastilab.analysis import lm_experiments as lx
from elastilab.analysis import plots
from elastilab.core.routing import n_kept
from elastilab.core.trace import RoutingDecision, RoutingTrace
from elastilab.training.losses import router_aux_losses

HALF = dict(attn_tokens=0.5, mlp_tokens=0.5, attn_heads=0.5, mlp_experts=0.5)


def elastic(name, **caps):
    return el.elastify(CASES[name]().model, el.ElasticConfig(**{**HALF, **caps}, n_experts=4))


def check_against_blocks(em, trace, T, protected):
    """Every decision is the block's own and has the sizes its capacity asks for."""
    assert trace.n_layers == len(em.adapter.layers(em.model))
    for b in em.blocks:
        mine = {c: d for (layer, c), d in trace.items() if layer == b.layer_idx}
        assert mine == b.decisions and all(isinstance(d, RoutingDecision) for d in mine.values())
        if "attn_tokens" in mine:
            keep = mine["attn_tokens"].chosen
            assert keep[:, :protected].all() and (keep[:, protected:].sum(1) == n_kept(0.5, T - protected)).all()
            rows = int(keep.sum())  # the heads are chosen for the tokens that entered attention only
        else:  # every token of the batch enters attention
            rows = mine["mlp_tokens"].chosen.numel()
        heads = mine["attn_heads"].chosen
        assert heads.shape == (rows, 2) and (heads.sort(1).values.diff(1) > 0).all()  # 2 distinct of 4 heads
        keep = mine["mlp_tokens"].chosen
        assert keep[:, :protected].all() and (keep[:, protected:].sum(1) == n_kept(0.5, T - protected)).all()
        experts = mine["mlp_experts"]
        assert experts.chosen.shape == (int(keep.sum()), 2) and experts.n_slots == 4 and experts.kind == "params"


def test_lm_trace_holds_what_each_block_computed():
    em = elastic("llama")
    ids = torch.randint(0, 101, (2, 17))
    with torch.no_grad():
        expected = em(ids).logits
        trace = em.trace(ids)
    torch.testing.assert_close(trace.output.logits, expected)  # the forward the caller would run
    assert (0, "attn_tokens") not in trace and (1, "attn_tokens") in trace  # layer 0 attends to every token
    check_against_blocks(em, trace, T=17, protected=1)  # the attention sink is always kept
    keep = trace.map("mlp_tokens")
    assert keep.shape == (3, 2, 17) and (keep.sum(-1) == 1 + n_kept(0.5, 16)).all()
    assert trace.map("attn_tokens")[0].all()  # the layer without the router keeps every token
    usage = trace.usage("attn_heads")
    assert usage.shape == (3, 4) and np.allclose(usage.sum(1), 2)  # each row uses 2 heads
    assert trace.slot_map("mlp_experts", 2).sum(1).tolist() == [2] * int(trace[(2, "mlp_tokens")].chosen.sum())
    assert trace.components == ("attn_tokens", "mlp_tokens", "attn_heads", "mlp_experts")  # table order
    with em.routers_disabled(), torch.no_grad():
        assert len(em.trace(ids)) == 0  # the teacher routes nothing: no stale decisions of the last forward


def test_vit_trace_protects_the_prefix_and_feeds_the_maps():
    em = elastic("timm_vit")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        trace = em.trace(x)
    check_against_blocks(em, trace, T=3 + 16, protected=3)  # CLS + 2 registers, 16 patches
    maps = plots.routing_maps(em, x)
    for comp in ("attn_tokens", "mlp_tokens"):
        np.testing.assert_array_equal(maps[comp], trace.map(comp)[:, :, 3:])
        assert maps[comp].shape == (2, 2, 16) and (maps[comp].sum(-1) == 8).all()
    usage = plots.slot_usage(em, x)
    assert usage.keys() == {"attn_heads", "mlp_experts"}
    np.testing.assert_allclose(usage["mlp_experts"], trace.usage("mlp_experts"))


def old_readers(em, T, P):  # the ViT readers as they were, on each block's own record of its last forward
    maps = {}
    for comp in ("attn_tokens", "mlp_tokens"):
        m = np.ones((len(em.adapter.layers(em.model)), 2, T - P), bool)
        for b in em.blocks:
            if comp in b.decisions:
                m[b.layer_idx] = b.decisions[comp].chosen[:, P:].cpu().numpy()
        maps[comp] = m
    usage = {comp: torch.stack([torch.bincount(b.decisions[comp].chosen.reshape(-1), minlength=4).float()
                                / len(b.decisions[comp].chosen) for b in em.blocks if comp in b.decisions]).numpy()
             for comp in ("attn_heads", "mlp_experts")}
    return maps, usage


def test_readers_give_what_the_positional_readers_gave():
    em = elastic("timm_vit", attn_tokens=0.25)
    x = torch.randn(2, 3, 32, 32)
    usage = plots.slot_usage(em, x)
    for comp, old in old_readers(em, 19, 3)[1].items():
        np.testing.assert_allclose(usage[comp], old)
    maps = plots.routing_maps(em, x)
    for comp, old in old_readers(em, 19, 3)[0].items():
        np.testing.assert_array_equal(maps[comp], old)
    assert (maps["attn_tokens"].sum(-1) == 4).all()
    with em.capacity(attn_tokens=1.0):  # no layer routes it: every patch kept, as before
        assert plots.routing_maps(em, x)["attn_tokens"].shape == (2, 2, 16)
        assert plots.routing_maps(em, x)["attn_tokens"].all()

    lm = elastic("llama", **{c: 1.0 for c in HALF})
    ids = torch.randint(0, 101, (1, 20))
    keep = lx.routing_map(lm, ids, "mlp_tokens", 0.5)
    with lm.capacity(mlp_tokens=0.5), torch.no_grad():
        lm(ids)
        old = np.stack([lm.blocks[i].decisions["mlp_tokens"].chosen[0].numpy() for i in range(3)])
    np.testing.assert_array_equal(keep, old)
    token_map, per_layer = lx.slot_usage(lm, ids, "attn_heads", 0.5, layer=1)
    with lm.capacity(attn_heads=0.5), torch.no_grad():
        lm(ids)
        chosen = {b.layer_idx: b.decisions["attn_heads"].chosen for b in lm.blocks}
    old_map = np.zeros((20, 4))
    np.put_along_axis(old_map, chosen[1].numpy(), 1, axis=1)
    np.testing.assert_array_equal(token_map, old_map)
    np.testing.assert_allclose(per_layer, np.stack([torch.bincount(chosen[i].reshape(-1), minlength=4).numpy() / 20
                                                    for i in range(3)]))


def test_router_losses_read_the_training_forward_with_its_gradient():
    em = elastic("llama")
    ids = torch.randint(0, 101, (2, 12))
    with em.training_estimator():
        em(ids, use_cache=False)
        bce, bal = router_aux_losses(em)
    records = [(comp, d.scores, d.chosen) for b in em.blocks for comp, d in b.decisions.items()]
    old_bce = np.mean([F.binary_cross_entropy_with_logits(s.float(), c.float()).item()
                       for comp, s, c in records if comp.endswith("_tokens")])
    old_bal = np.mean([4 * (torch.bincount(c.reshape(-1), minlength=4).float() / c.numel() * s.softmax(-1).mean(0))
                       .sum().item() for comp, s, c in records if comp in HALF and not comp.endswith("_tokens")])
    assert bce.item() == pytest.approx(old_bce, rel=1e-6) and bal.item() == pytest.approx(old_bal, rel=1e-6)
    (bce + bal).backward()
    router = em.blocks[1].routers
    assert all(router[c].proj.weight.grad.abs().sum() > 0 for c in HALF)  # the trace kept the scores' graph


def test_calibration_reads_the_token_decisions():
    em = elastic("llama", attn_heads=1.0, mlp_experts=1.0)
    em.calibrate(torch.randint(0, 101, (4, 16)))
    trace = em.set_mode("threshold").trace(torch.randint(0, 101, (1, 16)))
    assert {c for _, c in trace} == {"attn_tokens", "mlp_tokens"}  # calibrated routers route in threshold mode


def test_trace_readers_refuse_the_wrong_component_clearly():
    em = elastic("llama", attn_heads=1.0)
    with torch.no_grad():
        trace = em.trace(torch.randint(0, 101, (1, 9)))
    with pytest.raises(ValueError, match="does not choose tokens"):
        trace.map("mlp_experts")
    with pytest.raises(ValueError, match="chooses tokens, not slots"):
        trace.usage("mlp_tokens")
    with pytest.raises(ValueError, match="no layer routed attn_heads"):
        trace.usage("attn_heads")
    with pytest.raises(ValueError, match="layer 0 did not route"):
        RoutingTrace({(1, "mlp_experts"): trace[(1, "mlp_experts")]}, 3).slot_map("mlp_experts", 0)
    assert trace.map("attn_tokens")[0].all()
    with pytest.raises(ValueError, match="pass tokens"):
        RoutingTrace({}, 3).map("attn_tokens")
    assert RoutingTrace({}, 3).map("attn_tokens", (1, 9)).shape == (3, 1, 9)
