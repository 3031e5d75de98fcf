"""Tiny random models of every supported family, for the invariant tests (tests/test_invariants.py).

Each case builds a model and an input; adding an adapter means adding a case here, and the same
invariants then run on it (the kvpress way: one registry, one test suite).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

CASES: dict[str, Callable[[], "Case"]] = {}


@dataclass
class Case:
    model: torch.nn.Module
    inputs: dict                      # keyword arguments of model(...)
    output: Callable                  # model output -> tensor to compare
    causal: bool = True
    distill: Callable | None = None   # (elastic_model, steps) -> None: a few real training steps
    n_experts: int = 4


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


@case("gpt2")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=101, n_embd=64, n_layer=3, n_head=4, n_positions=128,
                     bos_token_id=0, eos_token_id=0)
    return Case(GPT2LMHeadModel(cfg).eval(), {"input_ids": torch.randint(0, 101, (2, 17))},
                lambda out: out.logits, distill=_lm_distill)
