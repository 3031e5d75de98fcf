"""Tiny random models of every supported family, for the invariant tests (tests/test_invariants.py).

Each case builds a model and an input; adding an adapter means adding a case here, and the same
invariants then run on it (the kvpress way: one registry, one test suite).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

CASES: dict[str, Callable[[], "Case"]] = {}
SLIDING_WINDOW = 4096  # Mistral-7B-v0.1's; test_invariants sets a short one to show the known limitation


@dataclass
class Case:
    model: torch.nn.Module
    inputs: dict                      # keyword arguments of model(...)
    output: Callable                  # model output -> tensor to compare
    causal: bool = True
    distill: Callable | None = None   # (elastic_model, steps) -> None: a few real training steps
    n_experts: int = 4
    prefix: int = 0                   # CLS + register tokens in front of the patches (ViTs)
    #: (elastic_model, ids [B, T], n) -> ids [B, T + n]: greedy decoding with the KV cache (causal cases)
    generate: Callable = lambda em, ids, n: em.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)


def case(name):
    def register(fn):
        CASES[name] = fn
        return fn
    return register


def _lm_distill(em, steps):
    import elastilab as el
    data = torch.randint(0, 101, (8, 12))
    el.distill(em, data, steps=steps, batch_size=4, lr=1e-2, progress=False)


@case("llama")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return Case(LlamaForCausalLM(cfg).eval(), {"input_ids": torch.randint(0, 101, (2, 17))},
                lambda out: out.logits, distill=_lm_distill)


@case("llama_biases")
def llama_biases():  # attention_bias and mlp_bias: every projection has a bias, gate_proj's included
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attention_bias=True, mlp_bias=True)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("proj.bias"):
                p.normal_(std=0.5)  # initialised to zero: make every bias matter
    return Case(model, {"input_ids": torch.randint(0, 101, (2, 17))}, lambda out: out.logits, distill=_lm_distill)


@case("qwen2")
def qwen2():  # Llama layer code with q/k/v biases
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_()  # non-zero biases, so they are really tested
    return Case(model, {"input_ids": torch.randint(0, 101, (2, 13))}, lambda out: out.logits, distill=_lm_distill)


# head_dim other than hidden/heads (as Mistral-Nemo); sliding window (v0.1's 4096, longer than the inputs)
@case("mistral")
def mistral():
    from transformers import MistralConfig, MistralForCausalLM
    cfg = MistralConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                        sliding_window=SLIDING_WINDOW)
    return Case(MistralForCausalLM(cfg).eval(), {"input_ids": torch.randint(0, 101, (2, 17))},
                lambda out: out.logits, distill=_lm_distill)


def _randomize_norms(model, std=0.3):
    """Norm weights start at 1 (or at 0 for Gemma's 1 + w): random ones prove each norm is applied where it belongs."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.add_(torch.randn_like(p) * std)
    return model


@case("qwen3")
def qwen3():  # per-head q/k RMSNorm before RoPE; q/k/v/o biases (attention_bias)
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = Qwen3Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=128, attention_bias=True)
    model = _randomize_norms(_randomize_biases(Qwen3ForCausalLM(cfg))).eval()
    return Case(model, {"input_ids": torch.randint(0, 101, (2, 17))}, lambda out: out.logits, distill=_lm_distill)


@case("smollm3")
def smollm3():  # Llama with no RoPE in some layers (NoPE: here layer 1)
    from transformers import SmolLM3Config, SmolLM3ForCausalLM
    cfg = SmolLM3Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        no_rope_layers=[1, 0, 1],
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = _randomize_norms(SmolLM3ForCausalLM(cfg)).eval()
    return Case(model, {"input_ids": torch.randint(0, 101, (2, 17))}, lambda out: out.logits, distill=_lm_distill)


GEMMA3_WINDOW = 6  # shorter than the inputs, so sliding layers really drop keys (in the mask and in the KV cache)


@case("gemma3")
def gemma3():
    """Sliding layers (window 6) around a global one; pre- and post-norms, q/k norms, GeGLU, scaled embeddings,
    query_pre_attn_scalar other than head_dim, logit soft-capping; every norm and bias random."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    cfg = Gemma3TextConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                           query_pre_attn_scalar=24, sliding_window=GEMMA3_WINDOW, final_logit_softcapping=30.0,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                           attention_bias=True)
    model = _randomize_norms(_randomize_biases(Gemma3ForCausalLM(cfg))).eval()
    return Case(model, {"input_ids": torch.randint(0, 101, (2, 17))}, lambda out: out.logits, distill=_lm_distill)


@case("gemma2")
def gemma2():  # Gemma 3 without q/k norms, with attention-logit soft-capping (small, so that it bites)
    from transformers import Gemma2Config, Gemma2ForCausalLM
    cfg = Gemma2Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                       query_pre_attn_scalar=24, sliding_window=GEMMA3_WINDOW, attn_logit_softcapping=1.5,
                       final_logit_softcapping=30.0,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention"], attention_bias=True)
    model = _randomize_norms(_randomize_biases(Gemma2ForCausalLM(cfg))).eval()
    with torch.no_grad():  # attention logits of a few units (a random init gives ~0.02), where the cap bends them
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return Case(model, {"input_ids": torch.randint(0, 101, (2, 17))}, lambda out: out.logits, distill=_lm_distill)


@case("olmo2")
def olmo2():  # no pre-norms: post-norms of each sub-layer's output; q/k norms over the whole projection
    from transformers import Olmo2Config, Olmo2ForCausalLM
    cfg = Olmo2Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, attention_bias=True,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = _randomize_norms(_randomize_biases(Olmo2ForCausalLM(cfg))).eval()
    return Case(model, {"input_ids": torch.randint(0, 101, (2, 17))}, lambda out: out.logits, distill=_lm_distill)


@case("phi3")
def phi3():  # fused qkv_proj and gate_up_proj; partial rotary (as Phi-4-mini); a sliding window past the inputs
    from transformers import Phi3Config, Phi3ForCausalLM
    cfg = Phi3Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128, partial_rotary_factor=0.5,
                     sliding_window=SLIDING_WINDOW,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = _randomize_norms(Phi3ForCausalLM(cfg)).eval()
    return Case(model, {"input_ids": torch.randint(0, 101, (2, 17))}, lambda out: out.logits, distill=_lm_distill)


@case("gpt2")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=101, n_embd=64, n_layer=3, n_head=4, n_positions=128,
                     bos_token_id=0, eos_token_id=0)
    return Case(_randomize_biases(GPT2LMHeadModel(cfg)).eval(), {"input_ids": torch.randint(0, 101, (2, 17))},
                lambda out: out.logits, distill=_lm_distill)


# ---------------------------------------------------------------- vision transformers (non-causal)
def _vit_distill(em, steps):
    from elastilab.tasks.vit import distill_vit
    images = torch.randn(8, 3, 32, 32)
    distill_vit(em, images, steps=steps, batch_size=4, lr=1e-2, progress=False)


def _randomize_biases(model):
    """Random inits start biases at zero; non-zero ones prove an adapter carries every bias."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias") and "norm" not in n and "ln_" not in n:
                p.normal_(0, 0.1)
    return model


def _randomize_layer_scale(model):
    with torch.no_grad():  # LayerScale starts tiny in random inits: make the residual branches matter
        for n, p in model.named_parameters():
            if n.endswith(("ls1.gamma", "ls2.gamma", "lambda1")):
                p.uniform_(0.5, 1.5)
    return model


@case("timm_vit")
def timm_vit():  # CLS + 2 registers, LayerScale, qkv bias, classification head
    from timm.models.vision_transformer import VisionTransformer
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2,
                              num_classes=5, init_values=1.0, reg_tokens=2)
    return Case(_randomize_biases(_randomize_layer_scale(model)).eval(), {"x": torch.randn(2, 3, 32, 32)},
                lambda out: out, causal=False, distill=_vit_distill, prefix=3)


@case("hf_dinov2")
def hf_dinov2():  # LayerScale, last_hidden_state
    from transformers import Dinov2Config, Dinov2Model
    cfg = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                       image_size=32, patch_size=8)
    return Case(_randomize_biases(_randomize_layer_scale(Dinov2Model(cfg))).eval(),
                {"pixel_values": torch.randn(2, 3, 32, 32)},
                lambda out: out.last_hidden_state, causal=False, distill=_vit_distill, prefix=1)


@case("hf_vit_cls")
def hf_vit_cls():  # ViT with its classification head
    from transformers import ViTConfig, ViTForImageClassification
    cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    image_size=32, patch_size=8, num_labels=5)
    return Case(_randomize_biases(ViTForImageClassification(cfg)).eval(), {"pixel_values": torch.randn(2, 3, 32, 32)},
                lambda out: out.logits, causal=False, distill=_vit_distill, prefix=1)


@case("hf_vitmae")
def hf_vitmae():  # MAE encoder, no masking; fixed noise keeps the patch order
    from transformers import ViTMAEConfig, ViTMAEModel
    cfg = ViTMAEConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       image_size=32, patch_size=8, mask_ratio=0.0)
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32), "noise": torch.arange(16.0).expand(2, 16)}
    return Case(ViTMAEModel(cfg).eval(), inputs, lambda out: out.last_hidden_state, causal=False,
                distill=_vit_distill, prefix=1)


@case("hf_dinov2_registers")
def hf_dinov2_registers():  # CLS + 4 registers protected; the head reads CLS and the mean of the patches only
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersForImageClassification
    cfg = Dinov2WithRegistersConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                    image_size=32, patch_size=8, num_register_tokens=4, num_labels=5)
    model = _randomize_biases(_randomize_layer_scale(Dinov2WithRegistersForImageClassification(cfg))).eval()
    return Case(model, {"pixel_values": torch.randn(2, 3, 32, 32)}, lambda out: out.logits, causal=False,
                distill=_vit_distill, prefix=5)


@case("siglip")
def siglip():  # no CLS token (nothing protected), the final LayerNorm over every token, an attention-pooling head
    from transformers import SiglipVisionConfig, SiglipVisionModel
    cfg = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             image_size=32, patch_size=8)
    model = _randomize_norms(_randomize_biases(SiglipVisionModel(cfg))).eval()
    return Case(model, {"pixel_values": torch.randn(2, 3, 32, 32)}, lambda out: out.last_hidden_state, causal=False,
                distill=_vit_distill)


@case("clip")
def clip():  # CLS in front, a LayerNorm before the encoder, quick_gelu; with the projection head (not routed)
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=16)
    model = _randomize_norms(_randomize_biases(CLIPVisionModelWithProjection(cfg))).eval()
    return Case(model, {"pixel_values": torch.randn(2, 3, 32, 32)}, lambda out: out.last_hidden_state, causal=False,
                distill=_vit_distill, prefix=1)


# ---------------------------------------------------------------- visual-language (LLaVA)
LLAVA_IMAGE_ID = 127   # outside the text ids the tests draw (0..100), so text-only prompts hold no image
LLAVA_N_IMG = 5        # 28 px / patch 14 -> 4 patches + CLS ("full")


def _llava_inputs(n_rows=2, g=None):
    text = lambda n: torch.randint(0, 101, (n_rows, n), generator=g)  # noqa: E731
    ids = torch.cat([text(6), torch.full((n_rows, LLAVA_N_IMG), LLAVA_IMAGE_ID), text(6)], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(n_rows, 3, 28, 28, generator=g)}


def _llava_distill(em, steps):  # the LM components on the VLM task: KL on the answer tokens (the last 2)
    import elastilab as el
    from elastilab.tasks.vlm import answer_loss
    x = _llava_inputs(4, torch.Generator().manual_seed(1))
    feats = em.image_features(x["pixel_values"]).detach()
    answer = torch.zeros_like(x["input_ids"], dtype=torch.bool)
    answer[:, -2:] = True
    data = [{"input_ids": x["input_ids"][i], "attention_mask": x["attention_mask"][i], "answer_mask": answer[i],
             "image_features": feats[i]} for i in range(4)]
    el.distill(em, data, loss_fn=answer_loss, steps=steps, batch_size=2, lr=1e-2, progress=False)


def _llava_generate(em, ids, n):  # ElasticLlava.generate returns the new tokens only (greedy)
    return torch.cat([ids, em.generate(ids, max_new_tokens=n)], 1)


@case("llava")
def llava():
    """A DINOv2 tower and a Llama LM. The invariants cover the LM components (visual_tokens has its own
    tests in test_vlm.py); the threshold/generation test runs on text-only prompts, since a prompt cut
    inside its image has no matching image."""
    from transformers import Dinov2Config, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    cfg = LlavaConfig(
        vision_config=Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   patch_size=14, image_size=28),
        text_config=LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
        image_token_id=LLAVA_IMAGE_ID, vision_feature_layer=-1, vision_feature_select_strategy="full",
        projector_hidden_act="gelu")
    return Case(LlavaForConditionalGeneration(cfg).eval(), _llava_inputs(), lambda out: out.logits,
                distill=_llava_distill, generate=_llava_generate)


from model_cases_vlm import *  # noqa: E402,F401,F403  (SigLIP 2, SmolVLM: registered into CASES)
