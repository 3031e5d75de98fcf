"""What an ElasticModel adds to its pretrained model, in numbers (``em.parameter_summary()``) and in a line
(``repr(em)``)."""
from __future__ import annotations


def parameter_summary(em) -> dict:
    """Router (and LoRA) parameters, absolute and as a fraction of the pretrained model's."""
    n_router = sum(p.numel() for p in em.router_parameters())
    n_base = sum(p.numel() for n, p in em.model.named_parameters() if ".routers." not in n and ".lora_" not in n)
    out = {"router_params": n_router, "base_params": n_base, "fraction": n_router / n_base}
    n_lora = sum(p.numel() for p in em.lora_parameters())
    if n_lora:
        out.update(lora_params=n_lora, lora_fraction=n_lora / n_base)
    return out


def describe(em) -> str:
    s = parameter_summary(em)
    caps = ", ".join(f"{k}={v:g}" for k, v in em.capacities.items())
    extra = (f"; LoRA rank {em.elastic_config.lora_rank} {s['lora_params']:,} params = "
             f"{100 * s['lora_fraction']:.4f}%") if "lora_params" in s else ""
    return (f"ElasticModel({type(em.model).__name__}, {len(em.blocks)} elastic blocks, {caps}, "
            f"mode={em.elastic_config.mode}; routers {s['router_params']:,} params = "
            f"{100 * s['fraction']:.4f}% of {s['base_params']:,}{extra})")
