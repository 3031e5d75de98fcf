"""Rank-r LoRA on the routed blocks (issue 10, lever d): peft holds it, the routers' objective trains it.

peft injects the adapters (``inject_adapter_in_model``: each projection kept as ``base_layer``, the
factors as ``lora_A`` / ``lora_B``) into the pretrained layer inside every ``ElasticBlock``, and
defines the update ``get_delta_weight`` = alpha / r * B @ A, what its ``merge()`` adds. Two rules:

- The adapters' own forward stays disabled, so the pretrained layer, which ``routers_disabled()``
  runs as the teacher, is the pretrained model bit for bit however the LoRA was trained.
- The routed path reads *effective* weights W + ΔW: ``ElasticBlock._spec`` builds its spec while each
  adapted projection's weight reads as W + ΔW (``effective_weights``). Every routed execution takes its
  weights from the spec (token gathers, head slices of q/o, expert and unit slices of up/gate/down,
  the kernels), so each uses the LoRA with no code of its own: a slice of W + ΔW is the slice of the
  merged weight.

Targets: by default every linear projection of the routed blocks (Llama: q, k, v, o, gate, up, down).
Routing removes parts of both sub-layers, so both may need correcting, and rank 1 costs only
d_in + d_out parameters per projection (SmolLM2-135M: 305 k, 0.23% of the model). Layers that are
not routed (``dense_layers``) stay the pretrained ones. ``ElasticConfig.lora_targets`` narrows it.

Compute: without a gradient (inference, evaluation, FLOP counts) W + ΔW is built once per weight
version and cached, i.e. the LoRA is merged: no extra FLOPs per token, and ``compute.measure_flops``
builds it before counting. With a gradient (training) it is rebuilt every forward (r * d_in * d_out
multiply-adds per projection, whatever the token count), and the backward forms the full gradient of
W + ΔW per projection (about one more matmul per projection than routers alone).
"""
from __future__ import annotations

import itertools
import math
from contextlib import contextmanager

import torch
from torch import Tensor, nn

ADAPTER = "default"  # peft's adapter name; elastilab keeps one
_LINEAR = ("Linear", "Conv1D")  # nn.Linear and transformers' Conv1D (GPT-2, [in, out] weights)
_stamps = itertools.count(1)  # identifies each build of effective weights (ElasticBlock's caches key on it)


def linear_names(block) -> list[str]:
    """Names (last part) of the linear projections inside a block's pretrained layer."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in block.base_layer.named_modules()
                   if n and type(m).__name__ in _LINEAR})


def attach(em, rank: int, alpha: float | None = None, targets=(), seed: int = 0) -> None:
    """Inject a rank-``rank`` LoRA into the ``targets`` projections (default: all) of every routed
    block of ``em``, factors drawn from ``seed`` (A as peft draws it, B = 0: the model is unchanged)."""
    from peft import LoraConfig, inject_adapter_in_model  # (slow to import: only when a LoRA is made)
    blocks = em.blocks
    if not blocks:
        raise ValueError("LoRA goes into the routed blocks, and no block is routed here")
    if any(b.lora for b in blocks):
        raise ValueError("this model already has a LoRA; build it again (elastify) to change its rank or targets")
    names = linear_names(blocks[0])
    wanted = list(targets) or names
    unknown = [t for t in wanted if t not in names]
    if unknown:
        raise ValueError(f"lora_targets names {unknown}, not projections of the routed blocks; "
                         f"allowed: {', '.join(names)}")
    mods = {b: [m for n, m in b.base_layer.named_modules() if n.rsplit(".", 1)[-1] in wanted
                and type(m).__name__ in _LINEAR] for b in blocks}
    smallest = min(min(m.weight.shape) for ms in mods.values() for m in ms)
    if rank > smallest:  # checked before any block is changed
        raise ValueError(f"lora_rank {rank} exceeds the smallest dimension of the adapted projections ({smallest}); "
                         f"a low-rank update needs 1 <= lora_rank <= {smallest}")
    for b in blocks:
        conv = type(mods[b][0]).__name__ == "Conv1D"  # peft's fan_in_fan_out: weights stored [in, out]
        config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=0.0, target_modules=wanted,
                            fan_in_fan_out=conv, bias="none")
        with torch.random.fork_rng(devices=[]):  # peft draws A from the global RNG: leave it as it was
            inject_adapter_in_model(config, b.base_layer, adapter_name=ADAPTER)
        b.lora = {n: m for n, m in b.base_layer.named_modules() if hasattr(m, "lora_A") and ADAPTER in m.lora_A}
        for m in b.lora.values():
            m.enable_adapters(False)  # the pretrained layer (the teacher) never adds the LoRA itself
    reset(em, seed)
    for p in parameters(em):
        p.requires_grad_(True)


def detach(block) -> None:
    """Put the plain projections back into the block's pretrained layer (the LoRA is dropped)."""
    for name, m in block.lora.items():
        parent, _, child = name.rpartition(".")
        setattr(block.base_layer.get_submodule(parent) if parent else block.base_layer, child, m.get_base_layer())
    block.lora = {}
    block._lora_cache = None
    if "peft_config" in vars(block.base_layer):  # set by inject_adapter_in_model
        del block.base_layer.peft_config


def reset(em, seed: int) -> None:
    """Draw every A from ``seed`` (peft's kaiming-uniform, in a fixed name order) and zero every B."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in em.blocks:
            for name in sorted(b.lora):
                a, bb = b.lora[name].lora_A[ADAPTER].weight, b.lora[name].lora_B[ADAPTER].weight
                fresh = torch.empty(a.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=g)
                a.copy_(fresh)
                bb.zero_()


def parameters(em) -> list[nn.Parameter]:
    return [p for b in em.blocks for name in sorted(b.lora) for p in (b.lora[name].lora_A[ADAPTER].weight,
                                                                       b.lora[name].lora_B[ADAPTER].weight)]


def state(em) -> dict[str, Tensor]:
    """{"<layer>.lora.<projection>.A" / ".B": factor}: saved with the routers."""
    return {f"{b.layer_idx}.lora.{name}.{k}": getattr(b.lora[name], f"lora_{k}")[ADAPTER].weight
            for b in em.blocks for name in sorted(b.lora) for k in ("A", "B")}


def _merged(m) -> Tensor:
    w = m.get_base_layer().weight
    return w + m.get_delta_weight(ADAPTER).to(w.dtype)  # what peft's merge() adds, same arithmetic


@contextmanager
def effective_weights(block):
    """While inside, each adapted projection of ``block.base_layer`` reads its weight as W + ΔW (the
    spec the routed path builds holds views of it). Yields a stamp identifying this build (0: no LoRA)."""
    if not block.lora:
        yield 0
        return
    layers = list(block.lora.values())
    factors = [(m.get_base_layer().weight, m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight) for m in layers]
    train = torch.is_grad_enabled() and any(t.requires_grad for f in factors for t in f[1:])
    key = tuple((t.data_ptr(), t._version) for f in factors for t in f) + tuple(m.scaling[ADAPTER] for m in layers)
    cache = block._lora_cache
    if train or cache is None or cache[0] != key:  # training rebuilds it every forward (the graph to A, B)
        cache = (key, next(_stamps), {m.get_base_layer(): _merged(m) for m in layers})
        block._lora_cache = None if train else cache
    saved = {mod: mod._parameters["weight"] for mod in cache[2]}
    try:
        for mod, w in cache[2].items():
            mod._parameters["weight"] = w  # a plain tensor, only while the adapter builds the spec
        yield cache[1]
    finally:
        for mod, w in saved.items():
            mod._parameters["weight"] = w
