"""Cases of the SigLIP-tower families (model_cases.py imports them into CASES): SigLIP 2's NaFlex tower, SmolVLM's
tower on its own, and SmolVLM (SigLIP tower + pixel-shuffle connector + Llama LM)."""
from __future__ import annotations

import torch
from model_cases import Case, _randomize_biases, _randomize_norms, _vit_distill, case


@case("siglip2")
def siglip2():
    """Patchified inputs, no CLS; the second image a 2x8 grid (its own resized position grid). Padded patches: in
    test_siglip2.py (router training and Taylor scores refuse padded batches)."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    from elastilab.adapters.siglip2 import patchify
    cfg = Siglip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              patch_size=8, num_patches=16)
    model = _randomize_norms(_randomize_biases(Siglip2VisionModel(cfg))).eval()
    inputs = patchify(torch.randn(2, 3, 32, 32), 8)
    inputs["spatial_shapes"][1] = torch.tensor([2, 8])
    return Case(model, inputs, lambda out: out.last_hidden_state, causal=False, distill=_vit_distill)


def _smolvlm_vision_config():
    from transformers import SmolVLMVisionConfig
    return SmolVLMVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=32, patch_size=8)


@case("smolvlm_vision")
def smolvlm_vision():  # SmolVLM's tower alone: SigLIP layers (padded tiles: test_smolvlm.py)
    from transformers import SmolVLMVisionTransformer
    model = _randomize_norms(_randomize_biases(SmolVLMVisionTransformer(_smolvlm_vision_config()))).eval()
    return Case(model, {"pixel_values": torch.randn(2, 3, 32, 32)}, lambda out: out.last_hidden_state, causal=False,
                distill=_vit_distill)


SMOLVLM_IMAGE_ID = 127  # outside the text ids the tests draw (0..100)
SMOLVLM_N = 4           # 32 px / patch 8 = 4x4 patches, pixel-shuffled 2x2 -> 4 tokens per tile
SMOLVLM_TILES = 2       # per prompt (a tile and the global image, as the processor splits)


def smolvlm_model(cls_name="SmolVLMForConditionalGeneration"):
    import transformers
    from transformers import LlamaConfig
    config_cls = getattr(transformers, cls_name.replace("ForConditionalGeneration", "Config"))
    cfg = config_cls(vision_config=_smolvlm_vision_config().to_dict(),
                     text_config=LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=128).to_dict(),
                     image_token_id=SMOLVLM_IMAGE_ID, scale_factor=2)
    return _randomize_norms(getattr(transformers, cls_name)(cfg)).eval()


def smolvlm_inputs(n_rows=2, g=None):
    """text, tile 1, text, tile 2, text: [n_rows, 6 + 4 + 2 + 4 + 6]; pixel_values [n_rows, 2, 3, 32, 32]."""
    text = lambda n: torch.randint(0, 101, (n_rows, n), generator=g)  # noqa: E731
    tile = torch.full((n_rows, SMOLVLM_N), SMOLVLM_IMAGE_ID)
    ids = torch.cat([text(6), tile, text(2), tile, text(6)], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(n_rows, SMOLVLM_TILES, 3, 32, 32, generator=g)}


def _smolvlm_distill(em, steps):  # the LM components on the VLM task: KL on the answer tokens (the last 2)
    import elastilab as el
    from elastilab.tasks.vlm import answer_loss
    x = smolvlm_inputs(4, torch.Generator().manual_seed(1))
    feats = em.image_features(x["pixel_values"]).detach().view(4, SMOLVLM_TILES, SMOLVLM_N, -1)
    answer = torch.zeros_like(x["input_ids"], dtype=torch.bool)
    answer[:, -2:] = True
    data = [{"input_ids": x["input_ids"][i], "attention_mask": x["attention_mask"][i], "answer_mask": answer[i],
             "image_features": feats[i]} for i in range(4)]
    el.distill(em, data, loss_fn=answer_loss, steps=steps, batch_size=2, lr=1e-2, progress=False)


def _vlm_generate(em, ids, n):  # ElasticLlava.generate returns the new tokens only (greedy)
    return torch.cat([ids, em.generate(ids, max_new_tokens=n)], 1)


@case("smolvlm")
def smolvlm():
    """The LM components (visual_tokens has its own tests in test_smolvlm.py); the threshold/generation test
    runs on text-only prompts, as LLaVA's."""
    return Case(smolvlm_model(), smolvlm_inputs(), lambda out: out.logits, distill=_smolvlm_distill,
                generate=_vlm_generate)
