"""ElasticConfig.prefill = "dense": a prompt fed into a KV cache runs at capacity 1.0 and only the decode steps
after it are routed. On every causal LM family: the prompt's logits and measured FLOPs are
the teacher's, and each routed decode step after it equals the same step after a routed prompt at capacity
1.0 (a cache holding every token's dense keys), token routing and sliding windows included. A routed step
also follows a prompt the pretrained layers cached (``routers_disabled``): the positions of the cached keys
are kept with the cache, and keys the pretrained layers cached are every token's."""
import pytest
import torch
from model_cases import CASES

import elastilab as el
from elastilab.adapters import find_adapter
from elastilab.core.compute import measure_flops

LMS = [name for name in CASES if set(CASES[name]().inputs) == {"input_ids"} and CASES[name]().causal]
POINT = {"attn_heads": 0.5, "mlp_units": 0.5}


def _elastic(name, point, **cfg):
    case = CASES[name]()
    supported = {c: v for c, v in point.items() if c in find_adapter(case.model).components}
    if not supported:
        pytest.skip(f"{name} supports none of {sorted(point)}")
    return el.elastify(case.model, el.ElasticConfig(**supported, **cfg)), case.inputs["input_ids"]


def _decode(em, prompt, steps):
    """Logits of the prompt and of ``steps`` greedy decode steps after it, with the KV cache."""
    out = em(input_ids=prompt, use_cache=True)
    logits, cache = [out.logits], out.cache
    for _ in range(steps):
        out = em(input_ids=out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
        logits.append(out.logits)
    return logits


def _reference(em, prompt, steps):
    """The same decoding, the prompt routed at capacity 1.0: every token's dense keys in the cache."""
    out = _with_full_capacity(em, lambda: em(input_ids=prompt, use_cache=True))
    logits, cache = [out.logits], out.cache
    for _ in range(steps):
        out = em(input_ids=out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
        logits.append(out.logits)
    return logits


def _routed_parts(em) -> set[str]:
    """What the blocks' last forward chose: (token, head) pairs, (token, unit) pairs."""
    return {k for b in em.blocks for k in b.counts if k in ("head_pairs", "unit_pairs")}


def _with_full_capacity(em, fn):
    with em.capacity(**{c: 1.0 for c in em.capacities}):
        return fn()


@pytest.mark.parametrize("name", LMS)
def test_a_dense_prompt_is_the_teachers_and_the_decode_steps_after_it_are_routed(name):
    em, ids = _elastic(name, POINT, prefill="dense")
    with torch.no_grad():
        with em.routers_disabled():
            teacher = em(input_ids=ids, use_cache=True).logits
        trace = em.trace(input_ids=ids, use_cache=True)
        torch.testing.assert_close(trace.output.logits, teacher, rtol=1e-5, atol=1e-6)  # the dense model
        assert not trace.decisions and not _routed_parts(em)  # and chose nothing
        em(input_ids=ids)  # a plain call (evaluation) asks for no cache: routed, though transformers makes one
        assert _routed_parts(em)
        dense_flops = _with_full_capacity(em, lambda: measure_flops(em, input_ids=ids, use_cache=True))
        assert measure_flops(em, input_ids=ids, use_cache=True)["total"] == dense_flops["total"]

        got, want = _decode(em, ids, 3), _reference(em, ids, 3)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
        em.set_prefill("routed")  # the routed prompt differs from the teacher's: the routing is real
        assert not torch.allclose(_decode(em, ids, 0)[0], teacher, atol=1e-4)
        em.set_prefill("dense")
        cache = em(input_ids=ids[:, :-1], use_cache=True).cache
        em(input_ids=ids[:, -1:], cache=cache, use_cache=True)
        assert _routed_parts(em)  # a decode step is routed
        cache = em(input_ids=ids[:, :-1], use_cache=True).cache
        with em.routers_disabled():
            cache_d = em(input_ids=ids[:, :-1], use_cache=True).cache
            dense_step = measure_flops(em, input_ids=ids[:, -1:], cache=cache_d, use_cache=True)["total"]
        assert measure_flops(em, input_ids=ids[:, -1:], cache=cache, use_cache=True)["total"] < dense_step


@pytest.mark.parametrize("name", ["llama", "gemma3"])  # gemma3: sliding layers (window 6) under the 17 tokens
def test_token_routing_decodes_right_after_a_dense_prompt(name):
    em, ids = _elastic(name, {"attn_tokens": 0.5, "mlp_tokens": 0.5}, prefill="dense", mode="threshold")
    with torch.no_grad():
        em.calibrate(ids)
        got, want = _decode(em, ids[:, :9], 6), _reference(em, ids[:, :9], 6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_a_routed_model_decodes_right_after_the_teacher_filled_its_cache():
    """The positions of the cached keys follow the pretrained layers too (``routers_disabled`` prompt), with no
    state left from an earlier, longer routed generation."""
    em, ids = _elastic("llama", {"attn_tokens": 0.5, "attn_heads": 0.5}, mode="threshold")
    with torch.no_grad():
        em.calibrate(ids)
        _decode(em, ids, 2)  # an earlier generation: 17 + 2 cached positions, some tokens dropped
        with em.routers_disabled():
            out = em(input_ids=ids[:, :5], use_cache=True)
        cache = out.cache
        step = em(input_ids=ids[:, 5:6], cache=cache, use_cache=True).logits
        cache_r = _with_full_capacity(em, lambda: em(input_ids=ids[:, :5], use_cache=True)).cache
        ref_step = em(input_ids=ids[:, 5:6], cache=cache_r, use_cache=True).logits
    torch.testing.assert_close(step, ref_step, rtol=1e-4, atol=1e-5)


def test_prefill_settings_are_checked():
    with pytest.raises(ValueError, match=r"prefill must be one of \('routed', 'dense'\), got 'fast'"):
        el.ElasticConfig(mlp_units=0.5, prefill="fast")
    vit = CASES["timm_vit"]().model
    with pytest.raises(ValueError, match="prefill='dense' is for causal language models"):
        el.elastify(vit, el.ElasticConfig(mlp_tokens=0.5, prefill="dense"))
    em = el.elastify(CASES["timm_vit"]().model, el.ElasticConfig(mlp_tokens=0.5))
    with pytest.raises(ValueError, match="prefill='dense' is for causal language models"):
        em.set_prefill("dense")
    assert em.elastic_config.prefill == "routed"  # a refused call changes nothing
    lm = el.elastify(CASES["llama"]().model, el.ElasticConfig(mlp_units=0.5))
    assert lm.set_prefill("dense").elastic_config.prefill == "dense"
    assert all(b.prefill == "dense" for b in lm.blocks)


@pytest.mark.parametrize("name", ["llama", "gemma3", "gpt2", "llava"])
def test_generation_with_a_dense_prompt_starts_with_the_teachers_token(name):
    """The first new token comes from the prompt's last position: the teacher's with a dense prefill, whatever
    the decode steps after it choose (a VLM's language model included)."""
    em, ids = _elastic(name, {"attn_heads": 0.25, "mlp_units": 0.25})
    case = CASES[name]()
    if name == "llava":  # a text prompt (its image tokens would need the image)
        ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    first = lambda: case.generate(em, ids, 2)[:, ids.shape[1]]
    with torch.no_grad():
        with em.routers_disabled():
            teacher = first()
        routed = first()
        em.set_prefill("dense")
        dense = first()
    assert torch.equal(dense, teacher)
    assert not torch.equal(routed, teacher) or name == "gpt2"  # (harsh capacities change some first token)
