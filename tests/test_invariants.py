"""The five invariants of docs/DESIGN.md and the adapter contract (adapters/base.py), run on every model family
registered in model_cases.py."""
import model_cases
import pytest
import torch
from model_cases import CASES

import elastilab as el
from elastilab.adapters import REGISTRY, find_adapter
from elastilab.core.compute import measure_flops
from elastilab.core.config import GATED_COMPONENTS, LAYER_COMPONENTS

ALL = {c: 1.0 for c in LAYER_COMPONENTS}
# (component, attn_tokens_variant): every component once, and the key/value-keeping variant of
# attention-token routing where it matters (None: every component at once)
VARIANTS = [(None, "drop"), (None, "keep_kv"), *[(c, "drop") for c in LAYER_COMPONENTS + GATED_COMPONENTS],
            ("attn_tokens", "keep_kv")]


def make(name, variant="drop", **caps):
    case = CASES[name]()
    # the components the family supports (OLMo 2 refuses attn_heads: test_errors checks the refusal)
    supported = find_adapter(case.model).components
    caps = {c: v for c, v in (caps or ALL).items() if c in supported}
    if not caps:
        pytest.skip(f"{name} does not support these components")
    with torch.no_grad():
        reference = case.output(case.model(**case.inputs))
    em = el.elastify(case.model, el.ElasticConfig(**caps, n_experts=case.n_experts,
                                                  attn_tokens_variant=variant))
    return case, em, reference


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("component,variant", VARIANTS)
def test_capacity_one_is_the_pretrained_model(name, component, variant):
    case, em, reference = make(name, variant, **({component: 1.0} if component else {}))
    with torch.no_grad():
        out = case.output(em(**case.inputs))
        # the routed path really ran (not the base layers): lower capacity changes the output
        em.set_capacity(**{c: 0.5 for c in em.capacities})
        changed = case.output(em(**case.inputs))
    assert (out - reference).abs().max().item() <= 1e-4
    # (keep_kv: a ViT's CLS-only head moves ~1e-3, since the CLS query and every key stay computed)
    assert (changed - reference).abs().max().item() > (1e-5 if variant == "keep_kv" else 1e-3)
    with torch.no_grad(), em.routers_disabled():
        assert torch.equal(case.output(em(**case.inputs)), reference)


@pytest.mark.parametrize("name", sorted(CASES))
def test_only_routers_train_and_base_weights_stay_bit_identical(name):
    case, em, _ = make(name, **{c: 0.5 for c in LAYER_COMPONENTS})
    base = {n: p.detach().clone() for n, p in case.model.named_parameters() if ".routers." not in n}
    routers = {k: v.detach().clone() for k, v in em.router_state().items()}
    trainable = {n for n, p in case.model.named_parameters() if p.requires_grad}
    assert trainable and all(".routers." in n for n in trainable)
    case.distill(em, steps=3)
    for n, p in case.model.named_parameters():
        if ".routers." not in n:
            assert torch.equal(p, base[n]), n
    moved = [k for k, v in em.router_state().items() if "weight" in k and not torch.equal(v, routers[k])]
    assert len(moved) == len([k for k in routers if k.endswith("proj.weight")])


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("component,variant", VARIANTS[2:])
def test_measured_flops_fall_with_capacity_and_match_analytic(name, component, variant):
    case, em, _ = make(name, variant, **{component: 1.0})
    previous = None
    for capacity in (1.0, 0.75, 0.5, 0.25):
        em.set_capacity(**{component: capacity})
        f = measure_flops(em, **case.inputs)
        part = "attention" if component.startswith("attn") else "mlp"
        measured, analytic = f[part], f["analytic_" + part]
        assert abs(measured - analytic) <= 0.02 * analytic, (capacity, measured, analytic)
        assert abs(f["routers"] - f["analytic_routers"]) <= 0.02 * max(f["analytic_routers"], 1)
        if previous is not None:
            assert measured < previous
        previous = measured


@pytest.mark.parametrize("name", sorted(CASES))
def test_router_checkpoint_refuses_another_model(name, tmp_path):
    case, em, _ = make(name, mlp_tokens=0.5, attn_heads=0.5)
    em.save_routers(tmp_path / "r")
    other = CASES[name]().model  # same architecture, different random weights
    with pytest.raises(ValueError, match="trained for a different model"):
        el.load_routers(other, tmp_path / "r")
    # and the right model gets the very same routers back
    same = CASES[name]
    torch.manual_seed(0)
    fresh = same().model
    torch.manual_seed(0)
    again = same().model
    em2 = el.elastify(fresh, el.ElasticConfig(**{c: 0.5 for c in em.capacities}))
    em2.save_routers(tmp_path / "s")
    loaded = el.load_routers(again, tmp_path / "s")
    for k, v in em2.router_state().items():
        torch.testing.assert_close(loaded.router_state()[k], v, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", [n for n in sorted(CASES) if CASES[n]().causal])
@pytest.mark.parametrize("variant", ["drop", "keep_kv"])
@pytest.mark.parametrize("mode", ["threshold", "running"])
def test_threshold_mode_is_causal_and_generates_with_cache(name, variant, mode):
    case, em, _ = make(name, variant, attn_tokens=0.5, mlp_tokens=0.5, attn_heads=0.5, mlp_experts=0.5)
    ids = torch.randint(0, 101, (2, 26))  # text only (every case's vocabulary holds 101 text ids)
    em.calibrate(torch.randint(0, 101, (4, 24)))
    em.set_mode(mode)
    with torch.no_grad():
        full = em(ids).logits
        for cut in (1, 5, 18, ids.shape[1] - 3):  # (running mode: before and after its warm-up)
            assert torch.allclose(em(ids[:, :cut]).logits, full[:, :cut], atol=1e-5)
        out = case.generate(em, ids[:1, :14], 6)
        # the KV-cached generation equals greedy decoding recomputed without a cache
        trace = em.trace(out[:, :-1], use_cache=False)
        logits = trace.output.logits
    assert torch.equal(logits[0, 13:].argmax(-1), out[0, 14:])
    # threshold mode keeps about the calibrated fraction of tokens
    kept = [trace[b.layer_idx, "mlp_tokens"].chosen.float().mean().item() for b in em.blocks]
    assert 0.2 < sum(kept) / len(kept) < 0.8


def test_sliding_window_shorter_than_the_sequence(monkeypatch):
    """Past a sliding window (Mistral v0.1's 4096, here 8), transformers' KV cache drops the oldest keys of a
    sliding layer; the routed attention drops their positions with them (Gemma 3's case runs past its window
    of 6 in every invariant)."""
    monkeypatch.setattr(model_cases, "SLIDING_WINDOW", 8)  # the prompt and generation run past it
    test_threshold_mode_is_causal_and_generates_with_cache("mistral", "keep_kv", "threshold")


@pytest.mark.parametrize("name", ["mistral", "phi3", "gemma3"])
def test_sliding_layers_remember_the_positions_of_the_keys_their_cache_keeps(name, monkeypatch):
    monkeypatch.setattr(model_cases, "SLIDING_WINDOW", 8)
    _, em, _ = make(name, "keep_kv", attn_tokens=0.5, mlp_tokens=0.5)  # keep_kv: every token is cached
    em.calibrate(torch.randint(0, 101, (4, 24)))
    em.set_mode("threshold")
    ids = torch.randint(0, 101, (1, 21))
    with torch.no_grad():
        cache = em.model(ids[:, :20], use_cache=True).past_key_values
        em.model(ids[:, 20:], cache=cache, use_cache=True)  # one decoding step
    windows = []
    for b in em.blocks:
        window = b.adapter.block_spec(b.base_layer, b.layer_idx).attn.window
        windows.append(window)
        # a sliding layer keeps its last window - 1 keys (transformers' DynamicSlidingWindowLayer), a global one all
        expected = torch.arange(21 - (window - 1), 21) if window else torch.arange(21)
        positions = cache.layers[b.layer_idx].elastilab_positions[0]
        assert torch.equal(positions[0], expected), (b.layer_idx, positions)
        assert cache.layers[b.layer_idx].keys.shape[-2] == len(expected)
    assert any(windows) and (name != "gemma3" or None in windows)  # Gemma 3: sliding and global layers


@pytest.mark.parametrize("name", ["mistral", "phi3", "gemma3"])
def test_left_padded_generation_past_the_window_is_the_pretrained_model(name, monkeypatch):
    """Capacity 1.0 with a padded batch: a sliding layer's mask covers its window only, the routed path reads it
    by absolute key position (block.py realigns it)."""
    monkeypatch.setattr(model_cases, "SLIDING_WINDOW", 8)
    _, em, _ = make(name)
    ids = torch.randint(3, 101, (2, 6))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # the second row is left-padded: its padding stays inside the window a while
    run = lambda: em.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = run()
        with em.routers_disabled():
            ref = run()
    torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(ref.logits, 1), rtol=0, atol=1e-4)


def test_running_mode_keeps_the_capacity_on_text_unlike_the_calibration_text():
    """Scores shifted after calibration (text from another domain): threshold mode's fixed bar keeps
    almost every token, running mode's per-sequence quantile keeps about the capacity."""
    _, em, _ = make("llama", "drop", mlp_tokens=0.5)
    em.calibrate(torch.randint(0, 101, (4, 24)))
    with torch.no_grad():
        for b in em.blocks:
            b.routers["mlp_tokens"].proj.bias += 100.0
        ids = torch.randint(0, 101, (4, 80))
        kept = {}
        for mode in ("threshold", "running"):
            em.set_mode(mode)
            trace = em.trace(ids)
            kept[mode] = torch.stack([trace[b.layer_idx, "mlp_tokens"].chosen[:, 16:].float().mean()
                                      for b in em.blocks]).mean().item()
    assert kept["threshold"] > 0.99 and 0.4 < kept["running"] < 0.65


def test_every_registered_adapter_has_a_case():
    covered = {find_adapter(CASES[n]().model).name for n in CASES}
    assert covered == set(REGISTRY), f"adapters without a case in model_cases.py: {set(REGISTRY) - covered}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_adapter_hooks_describe_the_model(name):
    """The contract's model-level hooks (adapters/base.py) agree with what the model really does."""
    case = CASES[name]()
    adapter = find_adapter(case.model)
    captured = []
    hook = adapter.final_norm(case.model).register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        case.model(**case.inputs)
    hook.remove()
    # the final norm gives [B, T, d]: T the prompt (image tokens included) or the patches and the prefix
    T = case.inputs["input_ids"].shape[1] if adapter.causal else 16 + case.prefix  # 32x32 px / patch 8
    assert captured[-1].shape == (2, T, adapter.hidden_size(case.model))
    assert adapter.prefix_tokens(case.model) == case.prefix
    assert adapter.has_cls(case.model) == (case.prefix > 0)
    # every block protects its model's prefix tokens (LMs: the attention sink), however often layers() is called
    for _ in range(2):
        specs = [adapter.block_spec(layer, i) for i, layer in enumerate(adapter.layers(case.model))]
    assert {s.n_protected for s in specs} == {max(1, case.prefix) if adapter.causal else case.prefix}
    # the spec reads the model's own weights (fused ones through slices): views, never copies
    storages = {p.untyped_storage().data_ptr() for p in case.model.parameters()}
    for s in specs:
        for t in (*vars(s.attn).values(), *vars(s.mlp).values()):
            if torch.is_tensor(t):
                assert t.untyped_storage().data_ptr() in storages
    adapter.check_inputs(case.model, (), case.inputs)  # accepts the case's own inputs
