"""What ``elastify`` wraps: the model's layers checked against the configuration (supported components, no LoRA
or ElasticBlock already inside, valid layer indices), and an ``ElasticBlock`` built for each routed layer, before
the caller's model is touched."""
from __future__ import annotations

from torch import nn

from elastilab.adapters import Adapter
from elastilab.core.block import ElasticBlock
from elastilab.core.config import GATED_COMPONENTS, LAYER_COMPONENTS, ElasticConfig, layer_indices
from elastilab.core.spec import cluster_hidden_units


def blocks_to_wrap(model: nn.Module, config: ElasticConfig, adapter: Adapter) -> tuple[list, dict[int, ElasticBlock]]:
    """(the model's layers, {layer index: its ElasticBlock}); raises a clear error for a configuration the model
    cannot take. Nothing is replaced here: ElasticModel swaps the blocks in once all of them were built."""
    layer_comps = [c for c in config.components if c in LAYER_COMPONENTS + GATED_COMPONENTS]
    unsupported = [c for c in config.components if c not in adapter.components]
    if unsupported:
        why = "".join(f"; {c}: {adapter.why_not[c]}" for c in unsupported if c in adapter.why_not)
        raise ValueError(f"{adapter.name} models do not support {unsupported}; "
                         f"supported components: {', '.join(adapter.components)}{why}")
    layers = adapter.layers(model)
    if any(n.rsplit(".", 1)[-1].startswith("lora_") for n, _ in model.named_modules()):
        raise ValueError("the model holds LoRA adapters (peft) already; merge them into its weights first "
                         "(peft's merge_and_unload): elastilab adds its own with ElasticConfig.lora_rank")
    if any(isinstance(m, ElasticBlock) for m in layers):
        raise TypeError("model is already elastic (its layers are ElasticBlocks); call .unelastify() on "
                        "the ElasticModel that wraps it first to re-wrap it")
    n = len(layers)
    if n == 0 and layer_comps:
        raise ValueError(f"{type(model).__name__} has no layers to make elastic")
    dense = layer_indices(config.dense_layers, n, "dense_layers")
    for comp, kept in config.keep_dense.items():
        layer_indices(kept, n, f"keep_dense[{comp!r}]")
    check_family_options(config, adapter, model)
    wrapped = {}  # built first: the caller's model is touched only once every block was made
    for i in range(n):
        comps = {c: getattr(config, c) for c in layer_comps}
        if adapter.causal and i == 0:
            # layer 0's KV cache length is how transformers counts the tokens seen so far
            comps.pop("attn_tokens", None)
        if i in dense or not comps:
            continue
        order = None
        if "mlp_experts" in comps and config.expert_partition == "clustered":
            order = cluster_hidden_units(adapter.block_spec(layers[i], i).mlp, config.n_experts)
        wrapped[i] = ElasticBlock(layers[i], adapter, i, comps, config.n_experts, config.mode, order,
                                  attn_tokens_variant=config.attn_tokens_variant,
                                  skipped_tokens=config.skipped_tokens, prefill=config.prefill)
    if layer_comps and not wrapped:  # (a VLM may route only its visual tokens)
        why = ("every layer is in dense_layers" if len(set(dense)) == n else
               "attn_tokens is never routed in layer 0 of a causal model (its KV cache length counts "
               "the tokens seen) and no other layer is routed")
        raise ValueError(f"no layer was made elastic: {why}")
    return layers, wrapped


def check_family_options(config: ElasticConfig, adapter, model) -> None:
    """Settings that only one kind of model can take."""
    if config.skipped_tokens == "merge" and adapter.causal:
        raise ValueError("skipped_tokens='merge' is for vision transformers; a causal model would need "
                         "a kept token from each skipped token's own past in every chunk")
    if config.prefill == "dense" and not adapter.causal:
        raise ValueError("prefill='dense' is for causal language models (a prompt before decoding with a "
                         f"KV cache); {type(model).__name__} is not one: use prefill='routed'")
