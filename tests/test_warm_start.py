"""Oracle-supervised warm start (elastilab.training.warm_start): routers fitted on dense forward passes choose
like the oracle, without touching the model."""
import pytest
import torch
from model_cases import CASES

import elastilab as el
from elastilab.training.warm_start import warm_start


def chosen(em, comp, ids, scorer="learned"):
    """The candidates each block chose for comp at capacity 0.5: {layer: bool mask [rows, n]}."""
    with em.capacity(**{comp: 0.5}), em.scoring(scorer), torch.no_grad():
        trace = em.trace(ids)
        out = {}
        for b in em.blocks:
            scores, ids_ = trace[b.layer_idx, comp].scores, trace[b.layer_idx, comp].chosen
            out[b.layer_idx] = (torch.zeros(scores.shape, dtype=torch.bool)
                                .scatter_(-1, ids_.reshape(scores.shape[0], -1), True))
    return out


@pytest.mark.parametrize("comp", ["attn_heads", "mlp_experts"])
def test_warm_started_routers_choose_like_the_oracle(comp):
    torch.manual_seed(0)
    case = CASES["llama"]()
    em = el.elastify(case.model, el.ElasticConfig(attn_heads=1.0, mlp_experts=1.0, n_experts=4))
    base = {n: p.clone() for n, p in case.model.named_parameters() if ".routers." not in n}
    train, test = torch.randint(0, 101, (64, 24)), torch.randint(0, 101, (4, 24))
    agree = lambda: sum((chosen(em, comp, test)[i] & chosen(em, comp, test, "oracle")[i]).sum().item()
                        for i in range(3)) / sum(m.sum().item() for m in chosen(em, comp, test, "oracle").values())
    before = agree()
    fit = warm_start(em, train, components=[comp])
    after = agree()
    # a tiny random model: a linear router explains part of the oracle's ranking (chance agreement: 0.5)
    assert 0.1 < fit[comp] <= 1.0
    assert after > max(before + 0.08, 0.58), (before, after)
    assert em.capacities == {"attn_heads": 1.0, "mlp_experts": 1.0} and em.scorer is None
    assert all(torch.equal(p, base[n]) for n, p in case.model.named_parameters() if ".routers." not in n)


def test_clear_errors():
    case = CASES["llama"]()
    em = el.elastify(case.model, el.ElasticConfig(attn_heads=1.0))
    with pytest.raises(ValueError, match="elastic here"):
        warm_start(em, torch.randint(0, 101, (2, 8)), components=["mlp_experts"])
    with pytest.raises(ValueError, match="non-empty batch tensor"):
        warm_start(em, [[1, 2, 3]])
