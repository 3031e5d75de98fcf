"""Greedy generation against the teacher: ``generation.generation_agreement`` and ``elastilab generation``."""
import json

import pandas as pd
import pytest
import torch
from model_cases import CASES

import elastilab as el
from elastilab.analysis import generation as q
from elastilab.core.config import LAYER_COMPONENTS

K = 8  # new tokens per prompt


def tiny_model():
    torch.manual_seed(0)
    return CASES["llama"]().model  # 3 layers, 4 heads, vocab 101: the same weights every call


def tiny(**caps):
    return el.elastify(tiny_model(), el.ElasticConfig(**caps, n_experts=4))


def prompts(n=5, length=7, seed=1):
    return torch.randint(3, 101, (n, length), generator=torch.Generator().manual_seed(seed))


def test_capacity_one_matches_every_token():
    em = tiny(**{c: 1.0 for c in LAYER_COMPONENTS})
    r = q.generation_agreement(em, prompts(), K)
    assert r["matched"] == [K] * 5 and r["median_matched"] == r["mean_matched"] == K
    assert r["all_matched"] == 1.0 and r["teacher_forced_agreement"] == 1.0
    assert all(torch.equal(t, s) for t, s in zip(r["teacher"], r["student"]))
    assert all(t.shape == (K,) for t in r["teacher"])  # end-of-sequence never cuts a continuation short
    # prompts of different lengths (a list of id lists) are generated in equal-length groups
    ragged = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14, 15]]
    r = q.generation_agreement(em, ragged, 4, batch_size=2)
    assert r["matched"] == [4, 4, 4] and r["prompts"] == 3


def test_a_harmful_setting_matches_fewer_tokens():
    em = tiny(attn_heads=0.25, mlp_experts=0.25)  # 1 of 4 heads, 1 of 4 MLP slices: untrained routers
    r = q.generation_agreement(em, prompts(), K)
    assert r["mean_matched"] < K and r["all_matched"] < 1 and r["teacher_forced_agreement"] < 1
    assert r["median_matched"] == sorted(r["matched"])[2]
    # the teacher of an earlier result is reused as is; it matches what routers_disabled() generates
    again = q.generation_agreement(em, prompts(), K, teacher=r["teacher"])
    assert again["matched"] == r["matched"]
    with em.routers_disabled():
        assert all(torch.equal(a, b) for a, b in zip(q.greedy_continuations(em, prompts(), K), r["teacher"]))
    # per-token components need no calibration and give the same choices in either mode
    em.set_mode("threshold")
    assert q.generation_agreement(em, prompts(), K, teacher=r["teacher"])["matched"] == r["matched"]


def test_token_routing_generates_in_threshold_mode_only():
    em = tiny(attn_tokens=0.5, mlp_tokens=0.5)
    with pytest.raises(ValueError, match=r"attn_tokens, mlp_tokens below capacity 1.0 in mode 'topk'.*threshold"):
        q.generation_agreement(em, prompts(), K)
    em.set_mode("threshold")
    with pytest.raises(ValueError, match="needs calibrated token routers.*em.calibrate"):
        q.generation_agreement(em, prompts(), K)
    em.calibrate(torch.randint(0, 101, (4, 24), generator=torch.Generator().manual_seed(2)))
    one = q.generation_agreement(em, prompts(), K, batch_size=1)
    many = q.generation_agreement(em, prompts(), K, batch_size=4)  # batched decoding changes nothing
    assert one["matched"] == many["matched"]
    assert all(torch.equal(a, b) for a, b in zip(one["student"], many["student"]))
    assert one["mean_matched"] < K  # half the tokens skipped in every layer: it leaves the teacher's path
    # the first new token is the teacher-forced prediction at the prompt's end (threshold mode is causal)
    seq = torch.cat([prompts(), torch.stack(one["teacher"])], 1)
    with torch.no_grad():
        first = em(seq[:, :-1]).logits[:, prompts().shape[1] - 1].argmax(-1)
    assert [m > 0 for m in one["matched"]] == (first == torch.stack(one["teacher"])[:, 0]).tolist()


def test_bad_arguments_give_clear_errors():
    em = tiny(attn_heads=0.5)
    with pytest.raises(TypeError, match="tokenize text first"):
        q.generation_agreement(em, "Once upon a time", K)
    with pytest.raises(ValueError, match="no prompts"):
        q.generation_agreement(em, [], K)
    with pytest.raises(ValueError, match=r"LongTensor \[n_prompts, prompt_len\]"):
        q.generation_agreement(em, prompts()[None], K)
    with pytest.raises(ValueError, match="prompt 1 must be a non-empty 1-D sequence"):
        q.generation_agreement(em, [[4, 5], []], K)
    with pytest.raises(ValueError, match=r"prompt 0 has token ids outside the model's vocabulary \[0, 101\)"):
        q.generation_agreement(em, [[4, 500]], K)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        q.generation_agreement(em, prompts(), 0)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        q.generation_agreement(em, prompts(), K, batch_size=0)
    with pytest.raises(ValueError, match="teacher must hold 5 continuations of 8 tokens"):
        q.generation_agreement(em, prompts(), K, teacher=[torch.zeros(K, dtype=torch.long)] * 4)


def test_calibrate_fills_only_the_token_routers_in_use():
    em = tiny(attn_tokens=1.0, mlp_tokens=1.0)
    blocks = torch.randint(0, 101, (8, 32), generator=torch.Generator().manual_seed(3))
    with pytest.raises(RuntimeError, match="no token router was routing"):
        em.calibrate(blocks)
    em.set_capacity(mlp_tokens=0.5)
    em.calibrate(blocks)
    assert all(b.routers["mlp_tokens"].calibrated for b in em.blocks)
    assert not any(b.routers["attn_tokens"].calibrated for b in em.blocks if "attn_tokens" in b.routers)  # not layer 0
    em.set_mode("threshold")
    with torch.no_grad():
        trace = em.trace(blocks)
    kept = [trace[b.layer_idx, "mlp_tokens"].chosen.float().mean().item() for b in em.blocks]
    assert 0.3 < sum(kept) / len(kept) < 0.7  # the calibrated fraction, on the calibration text
    em.set_capacity(attn_tokens=0.5)
    with pytest.raises(RuntimeError, match="attn_tokens router is not calibrated"):
        em(blocks)  # a router left uncalibrated is refused when used


# ---------------------------------------------------------------- the CLI
def chars(s: str) -> list[int]:
    """A tokenizer for the tiny model: one id per character."""
    return [ord(c) % 98 + 3 for c in s]


@pytest.fixture
def tiny_cli(tmp_path, monkeypatch):
    em = tiny(**{c: 0.5 for c in LAYER_COMPONENTS})
    em.calibrate(torch.randint(0, 101, (4, 24), generator=torch.Generator().manual_seed(4)))
    em.save_routers(tmp_path / "routers")
    meta = json.loads((tmp_path / "routers" / "routers.json").read_text())
    meta["recommended_capacities"] = {"attn_heads": 0.75}
    (tmp_path / "routers" / "routers.json").write_text(json.dumps(meta))
    monkeypatch.setattr(el.zoo, "load", lambda name, **kw: (tiny_model(), chars))
    text = tmp_path / "held_out.txt"
    text.write_text("".join(f"Line {i}: the licensee shall keep notice {i * 7 % 13}.\n" for i in range(40)))
    return tmp_path, text


def test_cli_generation_writes_the_table(tiny_cli, capsys):
    from elastilab.cli.main import main
    tmp, text = tiny_cli
    out = tmp / "gen"
    args = ["generation", "--routers", str(tmp / "routers"), "--text", str(text), "--split", "all",
            "--prompts", "3", "--prompt-len", "6", "--new-tokens", "5", "--capacities", "0.5",
            "--point", "attn_heads=0.75,mlp_experts=0.75",
            "--point", '{"mlp_tokens": 0.5, "keep_dense": {"mlp_tokens": [0]}, "label": "edge dense"}',
            "--recalibrate", str(text), "--calibration-blocks", "2", "--out", str(out)]
    assert main(args) == 0
    df = pd.read_csv(out / "generation.csv")
    assert (out / "generation.png").stat().st_size > 1000
    assert set(df.columns) >= {"point", "components", "capacities", "mode", "calibration", "median_matched",
                               "mean_matched", "teacher_forced_agreement", "attention_compute", "mlp_compute",
                               "model_compute", "matched", "command", "date", "machine", "torch", "transformers"}
    dense = df[df.point == "dense"].iloc[0]
    assert dense.median_matched == 5 and dense.model_compute == 1.0 and dense.matched == "5 5 5"
    one = df[df.source == "sweep"]
    assert set(one.components) == set(LAYER_COMPONENTS) and (one.model_compute < 1).all()
    # token routing runs with the shipped thresholds and with thresholds recalibrated on --recalibrate
    tok = one[one.components.isin(["attn_tokens", "mlp_tokens"])]
    assert len(tok) == 4 and set(tok.calibration) == {"shipped", f"{text} (2 x 128 tokens)"}
    assert set(one[one.components == "attn_heads"].calibration) == {"-"}
    assert df[df.source == "recommended"].capacities.tolist() == ["attn_heads=0.75"]
    assert df[df.point == "edge dense"].keep_dense.iloc[0] == "mlp_tokens: 0"
    assert (df["mode"] == "threshold").all() and df.command.iloc[0].startswith("elastilab ")
    ref = df[df.source == "reference"]
    assert ref.point.tolist() == ["dense model in bfloat16"] and ref.model_compute.isna().all()
    assert "median_matched" in capsys.readouterr().out


def test_cli_generation_refuses_bad_requests(tiny_cli, capsys):
    from elastilab.cli.main import main
    tmp, text = tiny_cli
    common = ["generation", "--routers", str(tmp / "routers"), "--text", str(text), "--split", "all",
              "--prompt-len", "6", "--new-tokens", "3", "--no-bf16-reference"]
    with pytest.raises(SystemExit):  # --out is required
        main(common)
    assert "--out" in capsys.readouterr().err
    for bad, message in [("attn_heads", "component=capacity pairs"), ("attn_heads=two", "must be a number"),
                         ("attn_heads=1.5", "in (0, 1]"), ("mlp_slices=0.5", "unknown key"),
                         ('{"mlp_tokens": 0.5, "keep_dense": [0]}', "keep_dense must be a dict"),
                         ('{"mlp_tokens": 0.5, "keep_dense": {"mlp_tokens": [0.5]}}', "integer layer indices"),
                         ('{"attn_tokens": 0.5, "attn_tokens_variant": "skip"}', "must be one of ('drop', 'keep_kv')"),
                         ('{"attn_heads": 0.5, "label": 3}', "label must be a string")]:
        with pytest.raises(SystemExit):
            main(common + ["--point", bad, "--out", str(tmp / "x")])
        assert message in capsys.readouterr().err, bad
    out = ["--out", str(tmp / "x")]
    assert main(common + ["--mode", "topk"] + out) == 2
    assert "cannot generate in --mode topk" in capsys.readouterr().err
    assert main(common + ["--prompts", "1000"] + out) == 2
    assert "ask for fewer prompts" in capsys.readouterr().err
    assert main(common + ["--components", "visual_tokens"] + out) == 2
    assert "visual_tokens not routed by" in capsys.readouterr().err
    assert main(["generation", "--routers", str(tmp / "nowhere"), "--text", str(text)] + out) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp / "x").exists()  # nothing written by a refused run
    tiny(mlp_tokens=0.5).save_routers(tmp / "uncalibrated")
    plain = ["generation", "--routers", str(tmp / "uncalibrated"), "--text", str(text), "--split", "all",
             "--prompts", "2", "--prompt-len", "6", "--new-tokens", "3", "--no-bf16-reference"] + out
    assert main(plain) == 2
    assert "the mlp_tokens routers in" in capsys.readouterr().err and not (tmp / "x").exists()
    assert main(plain + ["--recalibrate", str(text), "--calibration-blocks", "2"]) == 0
    assert set(pd.read_csv(tmp / "x" / "generation.csv").calibration) == {"-", f"{text} (2 x 128 tokens)"}


def test_token_routing_in_topk_mode_refuses_to_decode_with_a_cache():
    em = tiny(mlp_tokens=0.5)
    ids = torch.randint(0, 101, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), pytest.raises(ValueError, match="cannot decode with a KV cache"):
        em.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)


def test_cli_generation_of_mlp_units_needs_no_routers(tiny_cli, capsys):
    from elastilab.cli.main import main
    tmp, text = tiny_cli
    out = tmp / "units"
    common = ["generation", "--text", str(text), "--split", "all", "--prompts", "2", "--prompt-len", "6",
              "--new-tokens", "4", "--no-bf16-reference", "--capacities", "0.5"]
    assert main([*common, "--components", "mlp_units", "--out", str(out)]) == 0
    df = pd.read_csv(out / "generation.csv")
    units = df[df.components == "mlp_units"].iloc[0]
    assert units.mlp_compute < 1 and units.calibration == "-" and 0 <= units.median_matched <= 4
    assert main([*common, "--components", "attn_heads", "--out", str(tmp / "no")]) == 2  # a router is needed
    assert "without --routers" in capsys.readouterr().err
