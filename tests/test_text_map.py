"""analysis.text_map: notebook 01's per-token routing map (words on the axis), its CSV round trip, the README's
picture."""
import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from model_cases import CASES

import elastilab as el
from elastilab.analysis import text_map
from elastilab.analysis.lm_experiments import routing_map

matplotlib.use("Agg")
import matplotlib.pyplot as plt


class CharTokenizer:
    """One token per character (ids below the tiny Llama's vocabulary of 101), decoded back exactly."""

    def decode(self, ids):
        return "".join(chr(32 + i) if i < 95 else "\n" for i in ids)

    def encode(self, text):
        return [95 if c == "\n" else ord(c) - 32 for c in text]


def test_word_ticks_put_one_tick_per_word_at_its_first_token():
    pieces = ["MP", "UT", "ER", " FA", "IL", "URE", ",", "\n    ", " OR", " ANY"]
    assert text_map.word_ticks(pieces) == ([0, 3, 7, 8, 9], ["MPUTER", "FAILURE,", "⏎", "OR", "ANY"])
    with pytest.raises(ValueError, match="no tokens"):
        text_map.word_ticks([])


def test_a_real_routing_map_survives_its_csv_and_is_drawn_with_the_words(tmp_path):
    torch.manual_seed(0)
    em = el.elastify(CASES["llama"]().model, el.ElasticConfig(mlp_tokens=0.5))
    tok = CharTokenizer()
    ids = torch.tensor([tok.encode("the cat sat\non the mat")])
    keep = routing_map(em, ids, "mlp_tokens", 0.5)
    pieces = text_map.pieces(tok, ids)
    assert "".join(pieces) == "the cat sat\non the mat" and keep.shape == (len(em.blocks), ids.shape[1])
    df = text_map.routing_map_table(keep, pieces, component="mlp_tokens", capacity=0.5)
    df.to_csv(tmp_path / "map.csv", index=False)
    keep2, pieces2 = text_map.map_of_table(pd.read_csv(tmp_path / "map.csv"))
    assert np.array_equal(keep2, keep) and pieces2 == pieces  # the newline and spaces too
    ax = text_map.show_map(keep, pieces, "mlp_tokens = 0.5")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["the", "cat", "sat", "⏎", "on", "the", "mat"]
    assert list(ax.get_xticks()) == [0, 3, 7, 11, 12, 14, 18]
    plt.close(ax.figure)
    with pytest.raises(ValueError, match=r"one column per piece; got \(2, 3\) for 4 pieces"):
        text_map.show_map(np.ones((2, 3)), ["a", "b", "c", "d"], "x")


def test_lm_routing_map_writes_the_committed_csv_again_and_only_into_out(tmp_path, monkeypatch):
    """`elastilab lm routing-map` (the command recorded in the README picture's CSV) on the offline SmolLM2."""
    from elastilab.analysis.figures import RESULTS
    from elastilab.cli import main as cli
    monkeypatch.chdir(tmp_path)
    assert cli.main(["lm", "routing-map", "--out", "res"]) == 0
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["lm_routing_map.csv", "res"]
    new, committed = (pd.read_csv(p / "lm_routing_map.csv") for p in (tmp_path / "res", RESULTS))
    cols = ["layer", "position", "piece", "kept", "component", "capacity"]
    pd.testing.assert_frame_equal(new[cols], committed[cols])
    assert committed.command[0] == new.command[0].replace("--out res", "--out benchmarks/results")
