"""Elastic LLaVA (elastilab.adapters.llava.model, tasks.vlm): the visual_tokens router, baselines, \
generation, errors, training."""
import pytest
import torch

import elastilab as el
from elastilab.adapters.llava.model import ElasticLlava
from elastilab.tasks import vlm

N_IMG = 5  # 28 px / patch 14 -> 4 patches + CLS ("full")
IMAGE_ID = 99


def tiny_llava():
    from transformers import Dinov2Config, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   patch_size=14, image_size=28),
        text_config=LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
        image_token_id=IMAGE_ID, vision_feature_layer=-1, vision_feature_select_strategy="full",
        projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = 98
    return model


def inputs(n_rows=2, images_per_row=1, text=(7, 4), left_pad=0):
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(n_rows):
        row = torch.randint(1, 90, (text[0],), generator=g).tolist()
        for _ in range(images_per_row):
            row += [IMAGE_ID] * N_IMG + torch.randint(1, 90, (text[1],), generator=g).tolist()
        rows.append(row)
    ids = torch.tensor(rows)
    mask = torch.ones_like(ids)
    if left_pad:
        ids[0, :left_pad], mask[0, :left_pad] = 0, 0
    pixels = torch.randn(n_rows * images_per_row, 3, 28, 28, generator=g)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


def make(**caps):
    model = tiny_llava()
    em = el.elastify(model, el.ElasticConfig(**caps, n_experts=4))
    torch.nn.init.normal_(em.visual_router.proj.weight) if em.visual_router is not None else None
    return model, em


def test_elastify_gives_an_elastic_llava_with_one_tiny_router():
    _, em = make(visual_tokens=0.5)
    assert isinstance(em, ElasticLlava)
    assert em.visual_parameter_fraction()["visual_router_params"] == 32 + 1
    assert [n for n, p in em.named_parameters() if p.requires_grad] == ["visual_router.proj.weight",
                                                                        "visual_router.proj.bias"]


@pytest.mark.parametrize("caps", [dict(visual_tokens=1.0), dict(visual_tokens=1.0, attn_tokens=1.0, mlp_tokens=1.0,
                                                                 attn_heads=1.0, mlp_experts=1.0)])
def test_capacity_one_is_the_teacher(caps):
    model, em = make(**caps)
    x = inputs(left_pad=2)
    with torch.no_grad():
        ref = model(**x).logits
        out = em(**x)
        em.set_capacity(**{c: 0.4 for c in caps})
        low = em(**x)
        with em.routers_disabled():
            teacher = em(**x).logits
    assert (out.logits - ref).abs().max().item() <= 1e-4
    assert (teacher - ref).abs().max().item() <= 1e-4
    assert low.logits.shape[1] == x["input_ids"].shape[1] - (N_IMG - 2)  # 2 of 5 image tokens kept
    assert (low.logits[:, -1] - ref[:, -1]).abs().max().item() > 1e-3


def test_dropped_tokens_leave_the_sequence_and_equal_masking_them_out():
    """Removing tokens (the execution path) == every token present with dropped keys gated to 0
    (the training estimator), at the kept positions."""
    _, em = make(visual_tokens=0.4)
    x = inputs()
    with torch.no_grad():
        routed = em(**x)
    feats = em.image_features(x["pixel_values"])
    with em.training_estimator(), torch.enable_grad():
        est = em(x["input_ids"], image_features=feats, attention_mask=x["attention_mask"])
    assert routed.image_keep.sum(1).tolist() == [2, 2]
    kept = routed.kept_positions
    assert torch.allclose(est.logits[torch.arange(2)[:, None], kept], routed.logits, atol=1e-4)
    est.logits[:, -1].sum().backward()
    assert em.visual_router.proj.weight.grad.abs().sum() > 0


def test_lm_compute_falls_with_the_visual_capacity():
    from torch.utils.flop_counter import FlopCounterMode
    _, em = make(visual_tokens=1.0)
    x = inputs(text=(3, 2))
    x["image_features"] = em.image_features(x.pop("pixel_values"))
    flops = []
    for c in (1.0, 0.6, 0.2):
        em.set_capacity(visual_tokens=c)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            em(**x)
        flops.append(fc.get_total_flops())
    assert flops[0] > flops[1] > flops[2]


@pytest.mark.parametrize("selector", ["router", "random"])
def test_generation_with_dropped_image_tokens_and_the_kv_cache(selector):
    _, em = make(visual_tokens=0.4, mlp_experts=0.5)
    em.selector = selector
    x = inputs(left_pad=3)
    cached = em.generate(**x, max_new_tokens=6, eos_token_id=[98])
    recomputed = em.generate(**x, max_new_tokens=6, eos_token_id=[98], use_cache=False)
    assert cached.shape == (2, 6)
    assert torch.equal(cached, recomputed)
    with torch.no_grad():
        out = em(**x, use_cache=True)
    assert out.past_key_values.get_seq_length() == x["input_ids"].shape[1] - 3  # 3 of 5 image tokens dropped


def test_fastv_keeps_the_budget_and_is_the_teacher_at_full_capacity():
    model, em = make(visual_tokens=1.0)
    em.selector, em.fastv_layer = "fastv", 1
    x = inputs(images_per_row=2)
    with torch.no_grad():
        ref = model(**x).logits
        assert (em(**x).logits - ref).abs().max() <= 1e-4
        em.set_capacity(visual_tokens=0.6)
        out = em(**x)
    assert out.image_keep.shape == (4, N_IMG) and out.image_keep.sum(1).tolist() == [3] * 4
    assert out.logits.shape[1] == x["input_ids"].shape[1] - 2 * 2  # layers >= 1 saw the pruned sequence
    assert (out.logits[:, -1] - ref[:, -1]).abs().max() > 1e-4
    tokens = em.generate(**x, max_new_tokens=3, eos_token_id=[98])  # falls back to no cache
    assert tokens.shape == (2, 3)


def test_clear_errors_for_prompts_and_images_that_do_not_match():
    _, em = make(visual_tokens=0.5)
    x = inputs()
    text_only = torch.randint(1, 90, (2, 9))
    with pytest.raises(ValueError, match="no image tokens"):
        em(text_only, pixel_values=x["pixel_values"])
    with pytest.raises(ValueError, match="no image was given"):
        em(x["input_ids"])
    with pytest.raises(ValueError, match=r"need 3 x 5 = 15"):  # more images than image tokens
        em(x["input_ids"], pixel_values=torch.randn(3, 3, 28, 28))
    with pytest.raises(ValueError, match="selector must be one of"):
        em.selector = "best"


def test_only_the_visual_router_trains_with_kl_on_the_answers(tmp_path):
    model, em = make(visual_tokens=0.5)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = em.visual_router.proj.weight.detach().clone()
    x = inputs(n_rows=4)
    feats = em.image_features(x["pixel_values"]).detach()
    answer = torch.zeros_like(x["input_ids"], dtype=torch.bool)
    answer[:, -2:] = True
    data = [{"input_ids": x["input_ids"][i], "attention_mask": x["attention_mask"][i], "answer_mask": answer[i],
             "image_features": feats[i]} for i in range(4)]
    log = el.distill(em, data, loss_fn=vlm.answer_loss, steps=3, batch_size=2, progress=False,
                     capacity_range=(0.2, 0.8), lr=0.05)
    assert len(log) == 3 and log["kl"].notna().all()
    assert not torch.equal(before, em.visual_router.proj.weight)
    for n, p in model.named_parameters():
        assert torch.equal(p, base[n]), n
    em.save_routers(tmp_path / "r")
    again = el.load_routers(tiny_llava(), tmp_path / "r")
    assert isinstance(again, ElasticLlava)
    assert torch.equal(again.visual_router.proj.weight, em.visual_router.proj.weight)
    other = tiny_llava()
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="different model"):
        el.load_routers(other, tmp_path / "r")


def test_llava_15_7b_parameter_fraction_from_the_config_alone():
    count = vlm.llava_parameter_count(vlm.llava_15_7b_config())
    assert 7.0e9 < count["params"] < 7.1e9
    assert count["visual_router_params"] == 4097
    assert 5.7e-7 < count["fraction"] < 5.9e-7  # "as low as 0.00006%"


@pytest.mark.slow
def test_tiny_llava_is_a_real_llava_whose_elastic_twin_reproduces_it():
    from elastilab.zoo import tiny_llava as tl
    model, tok = el.zoo.load("tiny-llava")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    item = tl.examples("test")[0]
    b = tl.build_inputs(tok, item["question"], item["image"])
    assert int(b["input_ids"].eq(model.config.image_token_id).sum()) == tl.N_IMAGE_TOKENS == 65
    em = el.elastify(model, visual_tokens=1.0)
    with torch.no_grad():
        diff = (em(**b, logits_to_keep=1).logits[:, -1] - model(**b).logits[:, -1]).abs().max().item()
    assert diff <= 1e-4
    em.set_capacity(visual_tokens=0.25)
    assert em.generate(**b, max_new_tokens=2).shape == (1, 2)
    with pytest.raises(ValueError, match="placeholder"):  # more images than <image> placeholders
        tl.build_inputs(tok, item["question"], [item["image"], item["image"]])
    with pytest.raises(ValueError, match="placeholder"):  # a prompt without an image
        tl.build_inputs(tok, "What digit is this?", [item["image"]], chat=False)


def test_image_tokens_through_the_scorer_registry_and_the_frontier():
    """em.scoring picks the image-token selector (learned, random, fastv) and leaves the LM routers;
    unsupported scorers are refused; the frontier measures each at the same token budgets."""
    model, em = make(visual_tokens=1.0, mlp_experts=1.0)
    em.fastv_layer = 1
    x = inputs(images_per_row=1)
    em.set_capacity(visual_tokens=0.6)
    with torch.no_grad():
        kept = {}
        for name in ("learned", "random", "fastv"):
            with em.scoring(name):
                kept[name] = em(**x).image_keep
            assert em.selector == "router" and em.scorer is None  # restored
    assert all(k.sum(1).tolist() == [3, 3] for k in kept.values())
    with pytest.raises(ValueError, match="scorer 'oracle' does not support visual_tokens"):
        with em.scoring("oracle"):
            pass

    class Task:  # logits of the last position as the "answer": quality = agreement with the teacher
        metric, higher_is_better = "agreement", True

        def measure_input(self, em):
            return (), dict(x)

        def evaluate(self, em):
            with torch.no_grad(), em.routers_disabled():
                t = em(**x).logits[:, -1].argmax(-1)
            with torch.no_grad():
                s = em(**x).logits[:, -1].argmax(-1)
            a = (s == t).float().mean().item()
            return {"quality": a, "agreement": a}

    df = el.frontier(em, Task(), components=["visual_tokens"], capacities=(0.6,),
                     scorers=("learned", "random", "fastv", "oracle"), progress=False)
    assert set(df.scorer) == {"learned", "random", "fastv"} and ("oracle", "visual_tokens") in df.attrs["skipped"]
    routed = df[df.capacity < 1]
    assert (routed.model_compute < 1).all() and (routed.compute == routed.model_compute).all()


def test_vlm_commands_run_the_library_with_the_functions_defaults(monkeypatch, tmp_path):
    import functools

    from elastilab.analysis import vlm as commands
    from elastilab.cli import main as cli
    calls = {}
    for name in ("train_visual_router", "bench"):
        fake = lambda *a, _name=name, **k: calls.update({_name: (a, k)})  # noqa: E731
        monkeypatch.setattr(commands, name, functools.wraps(getattr(commands, name))(fake))
    assert cli.main(["vlm", "train", "--steps", 2, "--out", tmp_path / "r"]) == 0
    assert calls["train_visual_router"][0] == (2, 8, 1e-2, (0.15, 0.85), str(tmp_path / "r"), 0)
    assert calls["train_visual_router"][1] == {"tasks": commands.TRAIN_TASKS} == {"tasks": ("digit", "face", "scenes")}
    assert cli.main(["vlm", "train", "--tasks", "scenes,digit", "--out", tmp_path / "r"]) == 0
    assert calls["train_visual_router"][1] == {"tasks": ("scenes", "digit")}
    assert cli.main(["vlm", "bench", "--faces", 3, "--out", tmp_path / "b.json"]) == 0
    assert calls["bench"][0] == (commands.SHIPPED_ROUTERS, str(tmp_path / "b.json"), 10, 3)
