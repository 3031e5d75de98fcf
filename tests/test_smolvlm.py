"""Elastic SmolVLM / Idefics3 (elastilab.elastic_smolvlm): visual_tokens before the LM, generation, padded tiles,
the tower routed through the SigLIP adapter, refusals. The LM components run the invariant suite (case smolvlm)."""
import pytest
import torch
from model_cases_vlm import SMOLVLM_IMAGE_ID, SMOLVLM_N, SMOLVLM_TILES, smolvlm_inputs, smolvlm_model

import elastilab as el
from elastilab.adapters.smolvlm.model import ElasticSmolVLM
from elastilab.core.routing import n_kept

LM = dict(attn_tokens=1.0, mlp_tokens=1.0, attn_heads=1.0, mlp_experts=1.0)


def make(cls_name="SmolVLMForConditionalGeneration", **caps):
    torch.manual_seed(0)
    model = smolvlm_model(cls_name)
    em = el.elastify(model, el.ElasticConfig(**caps, n_experts=4))
    if em.visual_router is not None:  # a random ranking with real spread (the zero-ish init scores all alike)
        torch.nn.init.normal_(em.visual_router.proj.weight)
    return model, em


def reference_without(model, x, kept):
    """transformers' own pieces, independently of ElasticSmolVLM: the connector's tokens scattered into the image
    slots (as SmolVLMModel.forward), then the text model on the kept positions only (position ids of the full
    prompt), then the LM head."""
    m = model.model
    feats = torch.cat(list(m.get_image_features(x["pixel_values"]).pooler_output))
    slots = (x["input_ids"] == SMOLVLM_IMAGE_ID)[..., None]
    emb = m.get_input_embeddings()(x["input_ids"]).masked_scatter(slots, feats)
    emb = torch.gather(emb, 1, kept[..., None].expand(-1, -1, emb.shape[-1]))
    return model.lm_head(m.text_model(inputs_embeds=emb, position_ids=kept).last_hidden_state)


@pytest.mark.parametrize("cls_name", ["SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration"])
def test_capacity_one_is_the_pretrained_model_and_dropped_tokens_leave_the_sequence(cls_name):
    model, em = make(cls_name, visual_tokens=1.0, **LM)
    assert isinstance(em, ElasticSmolVLM)
    x = smolvlm_inputs(g=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(**x).logits
        out = em(**x)
        em.set_capacity(visual_tokens=0.5)
        low = em(**x)
        independent = reference_without(model, x, low.kept_positions)
    assert (out.logits - ref).abs().max().item() <= 1e-4
    k = n_kept(0.5, SMOLVLM_N)
    assert low.image_keep.shape == (2 * SMOLVLM_TILES, SMOLVLM_N) and low.image_keep.sum(1).tolist() == [k] * 4
    assert low.logits.shape[1] == x["input_ids"].shape[1] - SMOLVLM_TILES * (SMOLVLM_N - k)
    text = x["input_ids"] != SMOLVLM_IMAGE_ID  # every text token (around and between the tiles) is kept
    assert torch.equal(torch.zeros_like(text).scatter_(1, low.kept_positions, True) & text, text)
    assert (low.logits - independent).abs().max().item() <= 1e-4
    assert (low.logits[:, -1] - ref[:, -1]).abs().max().item() > 1e-3
    # the router kept the top-k of each tile by its own scores
    feats = em.image_features(x["pixel_values"])
    scores = em.visual_router(em.router_input(feats)).squeeze(-1)
    top = torch.zeros_like(low.image_keep).scatter_(1, scores.topk(k, 1).indices, True)
    assert torch.equal(top, low.image_keep)


@pytest.mark.parametrize("selector", ["router", "random"])
def test_generation_with_dropped_image_tokens_and_the_kv_cache(selector):
    _, em = make(visual_tokens=0.5, mlp_experts=0.5)
    em.selector = selector
    x = smolvlm_inputs(g=torch.Generator().manual_seed(3))
    cached = em.generate(**x, max_new_tokens=5, eos_token_id=[126])
    recomputed = em.generate(**x, max_new_tokens=5, eos_token_id=[126], use_cache=False)
    assert cached.shape == (2, 5) and torch.equal(cached, recomputed)
    with torch.no_grad():
        out = em(**x, use_cache=True)
    assert out.past_key_values.get_seq_length() == x["input_ids"].shape[1] - SMOLVLM_TILES * 2


def test_fastv_keeps_the_capacity_of_each_tile():
    _, em = make(visual_tokens=0.5)
    x = smolvlm_inputs()
    with torch.no_grad(), em.scoring("fastv"):
        out = em(**x)
    assert out.image_keep.sum(1).tolist() == [2] * 4 and torch.isfinite(out.logits).all()


def test_padding_tiles_are_dropped_as_transformers_does_and_uneven_batches_are_refused():
    model, em = make(visual_tokens=1.0)
    x = smolvlm_inputs(1)
    x["pixel_values"][0, 1] = 0  # an all-zero tile is padding: the prompt holds the first tile's tokens only
    keep = torch.ones_like(x["input_ids"], dtype=torch.bool)
    keep[0, 12:16] = False  # the second tile's image tokens
    x["input_ids"] = x["input_ids"][keep][None]
    x["attention_mask"] = x["attention_mask"][keep][None]
    with torch.no_grad():
        assert (em(**x).logits - model(**x).logits).abs().max().item() <= 1e-4
        two = smolvlm_inputs(2)
        two["pixel_values"][1, 1] = 0
        two["input_ids"][1, 12:16] = 5
        with pytest.raises(ValueError, match="every sequence in a batch must hold the same number of images"):
            em(**two)
        with pytest.raises(ValueError, match=r"pixel_values must be \[B, n_tiles, 3, H, W\]"):
            em(x["input_ids"], pixel_values=torch.randn(3, 32, 32))


def test_the_tower_routes_through_the_siglip_adapter_inside_the_vlm():
    model, em = make(visual_tokens=0.5, mlp_units=1.0)
    tower = el.elastify(model.model.vision_model, el.ElasticConfig(**LM))
    assert type(tower.adapter).__name__ == "SmolVLMVisionAdapter" and len(tower.blocks) == 2
    x = smolvlm_inputs()
    mask = torch.ones(2, SMOLVLM_TILES, 32, 32, dtype=torch.bool)
    mask[1, 0, :, 16:] = False  # a tile padded on its right half: the mask reaches the routed tower's attention
    with torch.no_grad():
        with tower.routers_disabled():
            ref = em(**x, pixel_attention_mask=mask).logits
        at_one = em(**x, pixel_attention_mask=mask).logits
        tower.set_capacity(mlp_tokens=0.5, attn_heads=0.5)
        low = em(**x, pixel_attention_mask=mask).logits
    assert (at_one - ref).abs().max().item() <= 1e-4 and (low - ref).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="takes tiles of at most 32x32 px"):
        tower(torch.randn(1, 3, 40, 40))


def test_a_language_model_outside_the_llama_family_is_refused():
    from model_cases_vlm import _smolvlm_vision_config
    from transformers import GPT2Config, SmolVLMConfig, SmolVLMForConditionalGeneration
    cfg = SmolVLMConfig(vision_config=_smolvlm_vision_config().to_dict(),
                        text_config=GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4).to_dict())
    with pytest.raises(TypeError, match="with a GPT2Model language model: elastilab routes the LM through its llama"):
        el.elastify(SmolVLMForConditionalGeneration(cfg), el.ElasticConfig(mlp_tokens=0.5))


def test_only_the_visual_router_trains():
    from elastilab.tasks.vlm import answer_loss
    model, em = make(visual_tokens=0.5)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = em.visual_router.proj.weight.detach().clone()
    x = smolvlm_inputs(4, torch.Generator().manual_seed(1))
    feats = em.image_features(x["pixel_values"]).detach().view(4, SMOLVLM_TILES, SMOLVLM_N, -1)
    answer = torch.zeros_like(x["input_ids"], dtype=torch.bool)
    answer[:, -2:] = True
    data = [{"input_ids": x["input_ids"][i], "attention_mask": x["attention_mask"][i], "answer_mask": answer[i],
             "image_features": feats[i]} for i in range(4)]
    el.distill(em, data, loss_fn=answer_loss, steps=3, batch_size=2, lr=1e-2, progress=False)
    assert not torch.equal(em.visual_router.proj.weight, before)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())


def test_cli_frontier_refuses_a_vlm_folder_clearly(tmp_path, capsys):
    from elastilab.cli.main import main
    smolvlm_model().save_pretrained(tmp_path / "smolvlm")
    (tmp_path / "t.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    assert main(["frontier", "--model", str(tmp_path / "smolvlm"), "--text", str(tmp_path / "t.txt"),
                 "--blocks", "1", "--seq-len", "16", "--split", "all", "--scorers", "random"]) == 2
    assert "holds a visual-language model: the vision-language frontier runs on tiny-llava" in capsys.readouterr().err
