"""keep_dense: chosen layers run a component dense whatever its capacity; saved with the routers."""
import pytest
import torch
from model_cases import CASES

import elastilab as el
from elastilab.core.compute import measure_flops


def test_kept_layers_run_dense_and_the_setting_round_trips(tmp_path):
    case = CASES["llama"]()
    em = el.elastify(case.model, el.ElasticConfig(mlp_tokens=0.5, attn_heads=0.5))
    n = len(em.blocks)
    with torch.no_grad():
        routed = measure_flops(em, **case.inputs)["mlp"]
        em.keep_dense(mlp_tokens=(0, -1))
        assert [b.capacity["mlp_tokens"] for b in em.blocks] == [1.0] + [0.5] * (n - 2) + [1.0]
        assert all(b.capacity["attn_heads"] == 0.5 for b in em.blocks)  # other components untouched
        kept = measure_flops(em, **case.inputs)["mlp"]
        assert kept > routed  # the kept layers really compute every token
        em.set_capacity(mlp_tokens=0.25)  # capacity changes skip the kept layers
        assert em.blocks[0].capacity["mlp_tokens"] == 1.0 and em.blocks[1].capacity["mlp_tokens"] == 0.25
        out = case.output(em(**case.inputs))
    em.save_routers(tmp_path / "r")
    em.unelastify()
    back = el.load_routers(case.model, tmp_path / "r")
    assert back.elastic_config.keep_dense == {"mlp_tokens": (-1, 0)}
    assert back.blocks[-1].capacity["mlp_tokens"] == 1.0 and back.blocks[1].capacity["mlp_tokens"] == 0.25
    with torch.no_grad():
        assert torch.equal(case.output(back(**case.inputs)), out)
    back.keep_dense(mlp_tokens=())  # route them again
    assert back.blocks[0].capacity["mlp_tokens"] == 0.25 and back.elastic_config.keep_dense == {}


def test_bad_keep_dense_is_a_clear_error():
    case = CASES["llama"]()
    em = el.elastify(case.model, el.ElasticConfig(mlp_tokens=0.5))
    with pytest.raises(ValueError, match="not elastic here"):
        em.keep_dense(attn_tokens=(0,))
    with pytest.raises(ValueError, match="list of layer indices"):
        em.keep_dense(mlp_tokens=0)
    with pytest.raises(ValueError, match="keep_dense must be a dict"):
        el.ElasticConfig(mlp_tokens=0.5, keep_dense=[0, 1])
