"""Every selection method (scorer) through the same tests, on tiny models of each family (a LLaVA's image tokens
included): capacity 1.0 is the teacher; at 0.5 exactly the requested share of candidates is computed, the
measured FLOPs match the analytic count of what was chosen, and an oracle's own work is left out of the total;
every scorer x family case chooses at least one component or is a declared exception; unsupported components
are refused clearly; the scorer contract is checked when a scorer is registered."""
import pytest
import torch
from model_cases import CASES

import elastilab as el
from elastilab.core.compute import measure_flops
from elastilab.core.config import GATED_COMPONENTS, LAYER_COMPONENTS
from elastilab.core.routing import n_kept
from elastilab.core.unit_plan import UnitPlan
from elastilab.scorers import SCORERS, Scorer, register, supports

FAMILIES = ["llama", "gpt2", "hf_dinov2", "hf_vit_cls", "gemma3", "siglip", "clip",
            "siglip2", "smolvlm_vision", "llava"]  # windows, post-norms; no CLS; image tokens
SCORER_NAMES = ["learned", *SCORERS]
COMPONENTS = LAYER_COMPONENTS + GATED_COMPONENTS + ("visual_tokens",)
CAUSAL = {"llama", "gpt2", "gemma3", "llava"}
#: the scorer x family cases that have nothing to choose, and why (every other case must choose >= 1 component)
NOTHING_TO_CHOOSE = {
    **{("tome", f): "token merging needs a vision transformer (bidirectional)" for f in CAUSAL},
    **{("cls_attention", f): "CLS attention needs a vision transformer with a CLS token"
       for f in CAUSAL | {"siglip", "siglip2", "smolvlm_vision"}},
    **{("fastv", f): "FastV chooses a VLM's image tokens" for f in set(FAMILIES) - {"llava"}},
    ("taylor", "llava"): "Taylor scores come from a dense forward + backward of the wrapped model's own input, "
                         "which ElasticLlava (image tokens leave the sequence) does not prepare",
}


def elastic(name):
    case = CASES[name]()
    with torch.no_grad():
        ref = case.output(case.model(**case.inputs))
    caps = {c: 1.0 for c in LAYER_COMPONENTS + GATED_COMPONENTS}
    if name == "llava":
        caps["visual_tokens"] = 1.0
    em = el.elastify(case.model, el.ElasticConfig(**caps, n_experts=case.n_experts))
    if name == "llava":  # a router with a ranking of its own (zero-initialised, it would keep the first tokens)
        torch.nn.init.normal_(em.visual_router.proj.weight)
    return case, em, ref


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    torch.manual_seed(0)
    return (request.param, *elastic(request.param))


def _chosen_units(em, inputs):
    """What each block's scorer returned for mlp_units in one forward: (candidates, scores or UnitPlan or None)."""
    seen = []
    hooks = [b.scoring.register_forward_hook(lambda m, a, out: seen.append((a[0], out))) for b in em.blocks]
    try:
        em(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return [(c, out) for c, out in seen if c.component == "mlp_units"]


@pytest.mark.parametrize("scorer", SCORER_NAMES)
def test_every_scorer_on_every_component_it_supports(family, scorer):
    name, case, em, ref = family
    supported = [c for c in COMPONENTS if c in em.capacities and supports(scorer, em, c)]
    if (scorer, name) in NOTHING_TO_CHOOSE:
        assert not supported, f"{scorer} on {name} chooses {supported}: remove it from NOTHING_TO_CHOOSE"
        pytest.skip(NOTHING_TO_CHOOSE[scorer, name])
    assert supported, f"{scorer} chooses nothing on {name}"
    assert "mlp_units" in em.capacities  # every family here has single MLP units
    for comp in supported:
        with em.scoring(scorer), torch.no_grad():
            out = case.output(em(**case.inputs))
            assert (out - ref).abs().max() <= 1e-4, f"{scorer} {comp}: capacity 1.0 must be the teacher"
            dense = measure_flops(em, **case.inputs)
            with em.capacity(**{comp: 0.5}):
                trace = em.trace(**case.inputs)
                routed = trace.output
                flops = measure_flops(em, **case.inputs)
                units = _chosen_units(em, case.inputs) if comp == "mlp_units" else []
        assert torch.isfinite(case.output(routed)).all()
        if comp == "visual_tokens":  # ceil(c * N) of each image's tokens enter the LM; every layer saves
            keep = routed.image_keep
            assert (keep.sum(1) == n_kept(0.5, keep.shape[1])).all(), scorer
            parts = ["attention", "mlp"]
        else:
            parts = ["attention" if comp.startswith("attn") else "mlp"]
        for b in em.blocks:  # exactly ceil(c * n) candidates per row (protected tokens aside)
            if (b.layer_idx, comp) not in trace:
                continue
            chosen = trace[b.layer_idx, comp].chosen
            if comp in ("attn_tokens", "mlp_tokens"):
                P = b._spec().n_protected
                counts = chosen[:, P:].sum(1)
                assert (counts == n_kept(0.5, chosen.shape[1] - P)).all(), (scorer, comp)
            else:
                assert chosen.shape[-1] == n_kept(0.5, b.routers[comp].proj.out_features)
        for c, got in units:  # a score per unit, a plan of ceil(c * F) distinct units, or None (the gate's)
            width = c.spec.mlp.width
            if isinstance(got, UnitPlan):
                assert got.units.shape == (len(c.h), n_kept(0.5, width)), scorer
                assert (got.units.sort(-1).values.diff(dim=-1) > 0).all(), scorer
            elif got is not None:
                assert got.shape == (len(c.h), width), scorer
        assert comp != "mlp_units" or len(units) == len(em.blocks)
        for part in parts:
            assert flops[part] < dense[part], (scorer, comp, part)
            assert flops[part] == pytest.approx(flops["analytic_" + part], rel=0.02)
        scorer_cls = SCORERS.get(scorer)
        if scorer_cls is not None and not scorer_cls.counted:  # an oracle's scoring is not compute
            assert flops["routers"] == 0 and flops["total"] < dense["total"]
            # the norm oracle scores inside the block (measured, then set aside); Taylor's forward +
            # backward runs before the counter (compute.measure_flops), so nothing of it is seen
            assert flops["oracle"] > 0 if scorer == "oracle" else flops["oracle"] == 0


def test_unsupported_components_are_refused_clearly():
    case, em, _ = elastic("llama")
    with pytest.raises(ValueError,
                       match="scorer 'magnitude' does not support mlp_tokens; it supports attn_heads, mlp_experts"):
        with em.capacity(mlp_tokens=0.5), em.scoring("magnitude"):
            pass
    with pytest.raises(ValueError, match="needs a vision transformer with a CLS token"):
        with em.capacity(attn_tokens=0.5), em.scoring("cls_attention"):
            pass
    with pytest.raises(ValueError, match="unknown scorer 'best'; registered: learned, random"):
        with em.scoring("best"):
            pass
    # a capacity changed inside the context is checked when the scorer is called
    with em.scoring("magnitude"), em.capacity(mlp_tokens=0.5), pytest.raises(ValueError, match="does not support"):
        em(**case.inputs)


def test_threshold_mode_needs_the_learned_routers():
    case, em, _ = elastic("llama")
    em.set_mode("threshold")
    with pytest.raises(ValueError, match="chooses by top-k"):
        with em.scoring("random"):
            pass


def test_scoring_restores_the_routers_and_takes_a_custom_scorer():
    case, em, _ = elastic("llama")
    em.set_capacity(mlp_tokens=0.5)
    with torch.no_grad():
        before = case.output(em(**case.inputs))

    class Last(Scorer):  # keep the latest tokens
        name = "last"
        components = ("mlp_tokens",)
        kinds = ("lm",)

        def __call__(self, c):
            return c.rows.float()

    with em.scoring(Last()) as s, torch.no_grad():
        assert em.scorer is s
        keep = em.trace(**case.inputs)[em.blocks[0].layer_idx, "mlp_tokens"].chosen
        T = keep.shape[1]
        assert keep[:, T - n_kept(0.5, T - 1):].all()  # the last half, plus the protected position 0
    assert em.scorer is None
    with torch.no_grad():
        assert torch.equal(case.output(em(**case.inputs)), before)


def test_oracle_beats_random_on_the_dense_contribution():
    """On one layer, dropping the MLP of the tokens with the smallest update must change the block's
    output less than dropping random ones (the oracle's definition, measured)."""
    case, em, _ = elastic("llama")
    block = em.blocks[1]
    x = torch.randn(2, 17, 64)
    with torch.no_grad(), em.capacity(mlp_tokens=1.0):
        full = block.routed(x, None, None, None)
    errs = {}
    for name in ("oracle", "random"):
        with torch.no_grad(), em.capacity(mlp_tokens=0.5), em.scoring(name):
            errs[name] = (block.routed(x, None, None, None) - full).norm().item()
    assert errs["oracle"] < errs["random"]


def test_tome_merges_instead_of_dropping():
    """ToMe: nothing is dropped — a merged patch receives exactly its group's MLP output — the sub-layer
    runs on ceil(c * N) tokens, and one bipartite step refuses to merge more than half."""
    from elastilab.core.routing import estimator_attention
    case, em, _ = elastic("hf_dinov2")
    block = em.blocks[0]
    x = torch.randn(2, 17, 64)  # CLS + 16 patches
    with torch.no_grad(), em.capacity(mlp_tokens=0.5), em.scoring("tome") as tome:
        out = block.routed(x, None, None, None)
        partner = tome.partner
        assert block.counts["mlp_rows"] == 2 * (1 + 8)
        spec = block._spec()  # the attention sub-layer runs dense: recompute it to isolate the MLP's update
        after_attn = x + estimator_attention(spec.attn, spec.attn_norm(x), torch.arange(17).expand(2, 17),
                                             None, None, None) * spec.ls1
    mlp_update = out - after_attn
    moved = partner != torch.arange(17)
    assert moved.sum(1).tolist() == [8, 8] and not moved[:, 0].any()  # 8 merges per image; CLS never
    for b, t in moved.nonzero().tolist():
        p = int(partner[b, t])
        assert not moved[b, p]  # merged into a token that stays
        torch.testing.assert_close(mlp_update[b, t], mlp_update[b, p])  # the group's output, shared
    assert (mlp_update.abs().sum(-1) > 1e-3).all()  # every token got an MLP update: merged, not skipped
    with em.capacity(mlp_tokens=0.25), pytest.raises(ValueError, match="at most half"):
        with em.scoring("tome"):  # refused when chosen, before any forward
            em(**case.inputs)


def test_skipped_tokens_merge_gives_each_skipped_token_its_nearest_kept_tokens_output():
    """skipped_tokens="merge" (ViTs): the same routers choose, the same rows are computed, and a skipped
    token receives the MLP output of its most similar kept token instead of nothing; refused for causal
    models; switching back to "drop" restores the drop path exactly."""
    from elastilab.core.routing import estimator_attention
    from elastilab.scorers import nearest_kept
    case, em, _ = elastic("hf_dinov2")
    block = em.blocks[0]
    x = torch.randn(2, 17, 64)
    with torch.no_grad(), em.capacity(mlp_tokens=0.5):
        dropped = block.routed(x, None, None, None)
        em.set_skipped_tokens("merge")
        merged = block.routed(x, None, None, None)
        assert block.counts["mlp_rows"] == 2 * (1 + 8)  # the same work
        keep = block.decisions["mlp_tokens"].chosen
        spec = block._spec()
        after_attn = x + estimator_attention(spec.attn, spec.attn_norm(x), torch.arange(17).expand(2, 17),
                                             None, None, None) * spec.ls1
        em.set_skipped_tokens("drop")
        assert torch.equal(block.routed(x, None, None, None), dropped)
    partner = nearest_kept(spec.mlp_norm(after_attn), keep)
    update = merged - after_attn
    for b, t in (~keep).nonzero().tolist():
        torch.testing.assert_close(update[b, t], update[b, int(partner[b, t])])
        torch.testing.assert_close(dropped[b, t], after_attn[b, t])  # "drop": nothing at all
    with pytest.raises(ValueError, match="for vision transformers"):
        elastic("llama")[1].set_skipped_tokens("merge")


@pytest.mark.parametrize("name", ["hf_dinov2", "timm_vit"])
@pytest.mark.parametrize("comp", ["attn_tokens", "mlp_tokens"])
def test_router_training_with_merging_has_the_routed_value_and_teaches_kept_tokens(name, comp):
    """Routers trained for skipped_tokens="merge": the estimator's forward value is the routed one
    (skipped tokens receive their nearest kept token's output), and every token's router, kept ones
    included, gets the gradient of being merged into its nearest other kept token — a different
    signal from the drop estimator's."""
    from elastilab.scorers import nearest_kept
    case, em, _ = elastic(name)
    grads = {}
    for how in ("merge", "drop"):
        em.set_skipped_tokens(how)
        with em.capacity(**{comp: 0.5}):
            with torch.no_grad():
                routed = case.output(em(**case.inputs))
            em.zero_grad()
            with em.training_estimator(), torch.enable_grad():
                est = case.output(em(**case.inputs))
                est.square().sum().backward()
        torch.testing.assert_close(est.detach(), routed, atol=2e-5, rtol=1e-5)
        grads[how] = torch.cat([p.grad.flatten() for p in em.router_parameters() if p.grad is not None])
    em.set_skipped_tokens("drop")
    assert grads["merge"].abs().sum() > 0 and not torch.allclose(grads["merge"], grads["drop"])
    h = torch.randn(2, 5, 8)
    keep = torch.tensor([[True, True, False, True, False], [False, True, False, False, False]])
    other = nearest_kept(h, keep, exclude_self=True)
    assert all(keep[b, other[b, t]] for b in range(2) for t in range(5))
    assert (other[0][keep[0]] != torch.arange(5)[keep[0]]).all()  # kept tokens: another kept one
    assert other[1].tolist() == [1] * 5  # the only kept token stands in for itself too


def test_registration_checks_the_contract_and_the_hooks_have_their_defaults():
    """A scorer declares a name, its components and model kinds and implements __call__, else registering it
    (or scoring with an instance) is refused with the reason; a name is never silently taken over."""
    def make(**attrs):
        attrs.setdefault("__call__", lambda self, c: c.rows.float())
        return type("Custom", (Scorer,), {"name": "custom", "components": ("mlp_tokens",), "kinds": ("lm",), **attrs})

    for attrs, match in [({"components": ()}, "must declare `components`"),
                         ({"kinds": ()}, "must declare `kinds`"),
                         ({"kinds": ("audio",)}, r"unknown kinds \['audio'\]; known: lm, vit, vlm"),
                         ({"components": ("mlp_token",)}, r"unknown components \['mlp_token'\]"),
                         ({"name": ""}, "must set `name`"), ({"name": "learned"}, "must set `name`"),
                         ({"counted": 1}, "`counted` must be True or False")]:
        with pytest.raises(ValueError, match=match):
            register(make(**attrs))
    with pytest.raises(TypeError, match="must implement __call__"):
        register(make(__call__=Scorer.__call__))
    with pytest.raises(ValueError, match="scorer name 'oracle' is taken by elastilab.scorers.oracles.Oracle"):
        register(make(name="oracle"))
    with pytest.raises(TypeError, match="subclasses elastilab.scorers.Scorer"):
        register(dict)
    assert "custom" not in SCORERS
    case, em, _ = elastic("llama")
    with pytest.raises(ValueError, match="must declare `kinds`"), em.scoring(make(kinds=())()):
        pass
    with em.capacity(mlp_tokens=0.5), pytest.raises(ValueError, match="scorer 'custom' works on models of kind vit; "
                                                                      "LlamaForCausalLM is of kind lm"):
        with em.scoring(make(kinds=("vit",))()):
            pass
    s = make()()
    assert s.merged_into() is None and s.image_layer(em) == 0 and s.before_forward(em, (), {}) is None
    assert s.counted and not SCORERS["oracle"].counted
