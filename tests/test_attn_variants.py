"""Attention-token routing in its two variants (ElasticConfig.attn_tokens_variant): "drop" (a skipped
token is neither query nor key/value) and "keep_kv" (a skipped token still offers its key and value;
only its query side is skipped). The shared invariants run on both in test_invariants.py."""
import json

import pytest
import torch
from model_cases import CASES

import elastilab as el
from elastilab.adapters import find_adapter
from elastilab.core.compute import measure_flops


def make(name, variant, **caps):
    case = CASES[name]()
    em = el.elastify(case.model, el.ElasticConfig(**caps, n_experts=case.n_experts, attn_tokens_variant=variant))
    return case, em


@pytest.mark.parametrize("name", ["llama", "gpt2", "timm_vit", "gemma3", "gemma2"])
@pytest.mark.parametrize("variant", ["drop", "keep_kv"])
@pytest.mark.parametrize("heads", [False, True])
def test_training_estimator_has_the_routed_forward_value(name, variant, heads):
    """The estimator (dense attention, every token a query, skipped outputs times a 0 gate) is an
    independent implementation: in keep_kv every token is its key/value, and chosen tokens must get
    exactly what the routed path gives them."""
    case, em = make(name, variant, attn_tokens=0.5, **({"attn_heads": 0.5} if heads else {}))
    inputs = {**case.inputs, **({"use_cache": False} if case.causal else {})}
    with torch.no_grad():
        routed = case.output(em(**inputs))
    with em.training_estimator(), torch.enable_grad():
        est = case.output(em(**inputs))
    torch.testing.assert_close(est.detach(), routed, atol=2e-5, rtol=1e-5)
    if variant == "keep_kv":  # the routers get a gradient through the gates
        est.square().sum().backward()
        assert all(p.grad is not None for p in em.router_parameters())


@pytest.mark.parametrize("name", ["llama", "gpt2", "timm_vit"])
def test_keep_kv_differs_from_drop_and_costs_between_drop_and_dense(name):
    case, em = make(name, "drop", attn_tokens=0.5)
    with torch.no_grad():
        drop = case.output(em(**case.inputs))
        f_drop = measure_flops(em, **case.inputs)
        em.set_attn_tokens_variant("keep_kv")
        keep = case.output(em(**case.inputs))
        f_keep = measure_flops(em, **case.inputs)
        with em.capacity(attn_tokens=1.0):
            f_dense = measure_flops(em, **case.inputs)
    assert (keep - drop).abs().max() > 1e-3  # chosen tokens now also see the skipped ones
    assert f_drop["attention"] < f_keep["attention"] < f_dense["attention"]
    assert f_keep["mlp"] == f_dense["mlp"]


HEADS = [n for n in sorted(CASES) if "attn_heads" in find_adapter(CASES[n]().model).components]  # not OLMo 2


@pytest.mark.parametrize("name", HEADS)
def test_keep_kv_with_head_routing_matches_analytic_flops(name):
    case, em = make(name, "keep_kv", attn_tokens=0.5, attn_heads=0.5)
    f = measure_flops(em, **case.inputs)
    assert abs(f["attention"] - f["analytic_attention"]) <= 0.02 * f["analytic_attention"]


@pytest.mark.parametrize("variant", ["drop", "keep_kv"])
def test_kv_cache_holds_every_token_only_in_keep_kv(variant):
    case, em = make("llama", variant, attn_tokens=0.5)
    ids = case.inputs["input_ids"][:1]
    em.calibrate(torch.randint(0, 101, (4, 24)))
    em.set_mode("threshold")
    with torch.no_grad():
        out = em.model(ids, use_cache=True)
    cache = out.past_key_values
    lengths = [cache.get_seq_length(b.layer_idx) for b in em.blocks if "attn_tokens" in b.routers]
    T = ids.shape[1]
    if variant == "keep_kv":
        assert lengths == [T] * len(lengths)
    else:
        assert all(n < T for n in lengths)


def test_variant_is_saved_loaded_and_switched_live(tmp_path):
    case, em = make("llama", "keep_kv", attn_tokens=0.5)
    with torch.no_grad():
        keep = case.output(em(**case.inputs))
    em.save_routers(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "routers.json").read_text())
    assert meta["elastic_config"]["attn_tokens_variant"] == "keep_kv"
    em.unelastify()
    back = el.load_routers(case.model, tmp_path / "r")
    assert back.elastic_config.attn_tokens_variant == "keep_kv"
    assert all(b.attn_tokens_variant == "keep_kv" for b in back.blocks)
    with torch.no_grad():
        assert torch.equal(case.output(back(**case.inputs)), keep)
        back.set_attn_tokens_variant("drop")
        drop = case.output(back(**case.inputs))
    assert not torch.equal(drop, keep)
    with pytest.raises(ValueError, match="attn_tokens_variant must be one of"):
        back.set_attn_tokens_variant("keep")
    assert back.elastic_config.attn_tokens_variant == "drop"
    # a checkpoint written before the field existed loads as the drop variant
    back.unelastify()
    del meta["elastic_config"]["attn_tokens_variant"]
    (tmp_path / "r" / "routers.json").write_text(json.dumps(meta))
    old = el.load_routers(case.model, tmp_path / "r")
    assert old.elastic_config.attn_tokens_variant == "drop"
    with torch.no_grad():
        assert torch.equal(case.output(old(**case.inputs)), drop)
    with pytest.raises(ValueError, match="attn_tokens_variant must be one of"):
        el.ElasticConfig(attn_tokens=0.5, attn_tokens_variant="flexidepth")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", ["drop", "keep_kv"])
def test_generation_survives_steps_that_skip_their_token(name, variant):
    """attn_tokens alone in threshold mode: a decoding step whose one token is skipped computes no
    query at all (the drop variant used to crash there); cached generation equals recomputation."""
    case, em = make(name, variant, attn_tokens=0.5)
    em.calibrate(torch.randint(0, 101, (4, 24)))
    em.set_mode("threshold")
    rows = []
    hooks = [b.register_forward_hook(lambda b, *_: rows.append(b.counts["attn_rows"])) for b in em.blocks]
    ids = case.inputs["input_ids"][:1, :6]
    with torch.no_grad():
        out = em.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        for h in hooks:
            h.remove()
        logits = em(out[:, :-1], use_cache=False).logits
    assert 0 in rows  # some step really skipped its token in some layer
    assert torch.equal(logits[0, 5:].argmax(-1), out[0, 6:])
