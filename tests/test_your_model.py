"""Notebook 07's library: a model and data in, the no-training frontier, single points and routing maps out."""
import matplotlib
import pytest
import torch
from model_cases import CASES

import elastilab as el
from elastilab.analysis import your_model as ym

matplotlib.use("Agg")
import matplotlib.pyplot as plt


class _Tok:
    def decode(self, ids):
        return f" t{ids[0]}"


@pytest.fixture
def subject():
    case = CASES["llama"]()
    em = el.elastify(case.model, el.ElasticConfig(**{c: 1.0 for c in ym.COMPONENTS}, n_experts=4))
    blocks = torch.randint(0, 101, (2, 16))
    return ym.Subject("tiny llama", "language", em, el.LMTask(blocks), "2 random blocks", tokenizer=_Tok(),
                      ids=blocks[:1])


def test_a_point_is_the_frontier_at_that_capacity(subject):
    df = ym.frontier(subject, capacities=(0.5,), progress=False)
    assert set(df.component) == {"mlp_units", "attn_heads"} and set(df.scorer) == set(ym.FRONTIER_SCORERS)
    assert subject.frontier_table is df and "tiny llama" in df.attrs["title"]
    row = df[(df.component == "mlp_units") & (df.scorer == "oracle") & (df.capacity == 0.5)].iloc[0]
    p = ym.point(subject, "mlp_units", "oracle", 0.5)
    assert p["quality"] == pytest.approx(row.ppl_ratio, rel=1e-5)
    assert p["compute"] == pytest.approx(row.compute, rel=1e-6) and p["compute"] < 0.9
    assert subject.em.capacities == {c: 1.0 for c in ym.COMPONENTS}  # left dense
    with pytest.raises(ValueError, match="cannot choose mlp_units"):
        ym.point(subject, "mlp_units", "attention_received", 0.5)
    assert ym.best_points(df).saving.between(0, 1).all()
    plt.close(ym.plot(df))


def test_routing_figure_has_a_map_per_scorer(subject):
    fig = ym.routing_figure(subject, "mlp_tokens", 0.5)
    assert [ax.get_title().split(":")[0] for ax in fig.axes] == ["attention_received", "oracle"]
    keep = fig.axes[1].get_images()[0].get_array()
    assert keep.shape == (3, 16) and 0 < keep.mean() < 1  # 3 layers x 16 tokens, some skipped
    plt.close(fig)
    with pytest.raises(ValueError, match="attn_tokens is not elastic"):
        ym.routing_figure(subject, "attn_tokens")


def test_bad_data_is_refused_before_the_model_loads(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such text file or image folder"):
        ym.load("smollm2-135m", tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="n >= 1"):
        ym.load("smollm2-135m", n=0)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="folder of images"):
        ym.load("dinov2-small", tmp_path / "notes.txt")
