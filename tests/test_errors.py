"""Bad input gets a clear, specific error: what was wrong and what is allowed."""
import pytest
import torch

import elastilab as el
from model_cases import CASES


@pytest.mark.parametrize("kwargs, match", [
    ({"mlp_tokens": 1.5}, r"capacity of mlp_tokens must be in \(0, 1\]"),
    ({"mlp_tokens": 0}, r"must be in \(0, 1\]"),
    ({"mlp_tokens": "half"}, "must be a number"),
    ({}, "enables no component"),
    ({"mlp_experts": 0.5, "n_experts": 0}, "n_experts must be a positive integer"),
    ({"mlp_experts": 0.5, "expert_partition": "random"}, "expert_partition must be one of"),
    ({"mlp_tokens": 0.5, "mode": "causal"}, "mode must be one of"),
])
def test_config_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        el.ElasticConfig(**kwargs)


def test_unknown_component_names_the_allowed_ones():
    with pytest.raises(TypeError):
        el.ElasticConfig(mlp_neurons=0.5)
    em = el.elastify(CASES["llama"]().model, mlp_tokens=0.5)
    with pytest.raises(ValueError, match="unknown component 'mlp_neurons'; allowed: attn_tokens"):
        em.set_capacity(mlp_neurons=0.5)
    with pytest.raises(ValueError, match="attn_heads is not elastic in this model"):
        em.set_capacity(attn_heads=0.5)


def test_expert_count_must_divide_the_mlp_width():
    with pytest.raises(ValueError, match="n_experts=5 does not divide the MLP width 96"):
        el.elastify(CASES["llama"]().model, el.ElasticConfig(mlp_experts=0.5, n_experts=5))


def test_unsupported_architecture_lists_the_supported_ones():
    from transformers import BertConfig, BertModel
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(TypeError, match="no adapter for BertModel. Supported: llama: LlamaForCausalLM"):
        el.elastify(bert, mlp_tokens=0.5)


def test_threshold_mode_needs_calibration():
    case = CASES["llama"]()
    em = el.elastify(case.model, el.ElasticConfig(mlp_tokens=0.5, mode="threshold"))
    with pytest.raises(RuntimeError, match="not calibrated for threshold mode; call ElasticModel.calibrate"):
        em(**case.inputs)


def test_double_elastify_and_missing_checkpoint(tmp_path):
    em = el.elastify(CASES["llama"]().model, mlp_tokens=0.5)
    with pytest.raises(TypeError, match="already elastic"):
        el.elastify(em, mlp_tokens=0.5)
    with pytest.raises(FileNotFoundError, match="holds no router checkpoint"):
        el.load_routers(CASES["llama"]().model, tmp_path)


def test_unelastify_restores_the_original_blocks():
    case = CASES["gpt2"]()
    with torch.no_grad():
        ref = case.output(case.model(**case.inputs))
    em = el.elastify(case.model, mlp_tokens=0.25)
    model = em.unelastify()
    with torch.no_grad():
        assert torch.equal(case.output(model(**case.inputs)), ref)


def test_clustered_experts_are_a_permutation_and_stay_exact():
    case = CASES["llama"]()
    with torch.no_grad():
        ref = case.output(case.model(**case.inputs))
    em = el.elastify(case.model, el.ElasticConfig(mlp_experts=1.0, n_experts=4, expert_partition="clustered"))
    for b in em.blocks:
        assert sorted(b.unit_order.tolist()) == list(range(96))
        assert b.unit_order.tolist() != list(range(96))
    with torch.no_grad():
        assert (case.output(em(**case.inputs)) - ref).abs().max() < 1e-4
