"""The notebook helpers that live in the library: analysis.vlm_views (notebook 03) and analysis.kernel_views
(notebook 04)."""
import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from test_vlm import N_IMG, inputs, make

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from elastilab.analysis import kernel_views, vlm_views  # noqa: E402


def test_answer_and_keep_uses_the_scorer_and_restores_the_capacities(monkeypatch):
    _, em = make(visual_tokens=1.0, mlp_experts=1.0)
    x = inputs(n_rows=1)
    monkeypatch.setattr(vlm_views.tl, "build_inputs", lambda tok, question, image: x)

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids.tolist()))

    keep, words = vlm_views.answer_and_keep(em, Tok(), {"question": "?", "image": None}, "random", 0.4,
                                            max_new_tokens=3, mlp_experts=0.5)
    assert keep.shape == (N_IMG,) and int(keep.sum()) == 2 and len(words.split()) == 3
    with torch.no_grad(), em.capacity(visual_tokens=0.4, mlp_experts=0.5), em.scoring("random"):
        assert torch.equal(em(**x).image_keep[0], keep)
    assert em.capacities == {"mlp_experts": 1.0, "visual_tokens": 1.0} and em.selector == "router"
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        vlm_views.answer_and_keep(em, Tok(), {"question": "?", "image": None}, max_new_tokens=0)


def test_overlay_kept_darkens_the_dropped_patches_and_names_the_cls(monkeypatch):
    monkeypatch.setattr(vlm_views.tl, "display_image", lambda image: np.ones((112, 112, 3)))
    keep = torch.zeros(1 + 64, dtype=torch.bool)
    keep[1:9] = True  # CLS dropped, the first row of 8 x 8 patches kept
    fig, ax = plt.subplots()
    vlm_views.overlay_kept(ax, None, keep, "learned")
    drawn = np.asarray(ax.images[0].get_array())
    assert ax.get_title() == "learned  CLS dropped"
    step = drawn.shape[0] // 8
    assert drawn[: step].min() == 255 and drawn[step:].max() < 255 // 2  # kept bright, dropped dark
    plt.close(fig)
    with pytest.raises(ValueError, match="one image's tokens"):
        vlm_views.overlay_kept(ax, None, keep[None], "x")


def test_headline_shows_the_largest_input_at_one_capacity():
    rows = [dict(component=c, backend="torch", heads="grouped", batch=b, seq=t, capacity=cap, dense_s=1.0,
                 routed_s=0.5, speedup=2.0, ideal_speedup=2.5, realised=0.8)
            for c in ("mlp_tokens", "all") for b, t in ((1, 128), (8, 512), (4, 512)) for cap in (0.5, 0.25)]
    table = kernel_views.headline(pd.DataFrame(rows))
    shown = table.data
    assert list(shown.columns) == kernel_views.HEADLINE_COLUMNS and list(shown.component) == ["mlp_tokens", "all"]
    assert "80%" in table.to_html()
    with pytest.raises(ValueError, match=r"no rows at capacity 0.75; measured: \[0.25, 0.5\]"):
        kernel_views.headline(pd.DataFrame(rows), 0.75)
    with pytest.raises(ValueError, match=r"missing columns \['realised'\]"):
        kernel_views.headline(pd.DataFrame(rows).drop(columns="realised"))
