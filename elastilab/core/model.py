"""elastify(): wrap a pretrained model's blocks with routers; the ElasticModel that controls them."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from elastilab.adapters import Adapter, find_adapter
from elastilab.core import lora, summary
from elastilab.core.block import ElasticBlock
from elastilab.core.budget import capacities_at
from elastilab.core.calibration import calibrate
from elastilab.core.checkpoint import save_routers
from elastilab.core.config import (
    GATED_COMPONENTS,
    LAYER_COMPONENTS,
    ElasticConfig,
    check_capacity,
    check_keep_dense,
    layer_indices,
)
from elastilab.core.trace import RoutingTrace
from elastilab.core.wrapping import blocks_to_wrap, check_family_options


class ElasticModel(nn.Module):
    """A pretrained model whose blocks are wrapped by ``ElasticBlock`` (the originals stay inside,
    as ``base_layer``, untouched). Calls go to the wrapped model; only router weights train."""

    def __init__(self, model: nn.Module, config: ElasticConfig, adapter: Adapter | None = None):
        super().__init__()
        self.model = model
        self.elastic_config = config
        self.adapter = adapter or find_adapter(model)
        layers, wrapped = blocks_to_wrap(model, config, self.adapter)
        n = len(layers)
        grads = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in grads:
            p.requires_grad_(False)
        for i, block in wrapped.items():
            layers[i] = block
        # the module owning the layers sees the cache arguments (a VLM's language model is called with its own)
        owner = next((m for m in model.modules() if any(c is layers for c in m.children())), model)
        self._cache_hook = owner.register_forward_pre_hook(self._note_cache_request, with_kwargs=True)
        for p in self.router_parameters():
            p.requires_grad_(True)
        if config.lora_rank:
            try:
                self.add_lora(config.lora_rank, config.lora_alpha, config.lora_targets)
            except BaseException:  # (targets and rank are checked on the blocks): leave the model as it was
                self.unelastify()
                for p, g in grads:
                    p.requires_grad_(g)
                raise
        for comp, steps in config.allocation.items():
            layer_indices([layer for layer, _ in steps], n, f"allocation[{comp!r}]")
        compute = config.compute  # (set_capacity below leaves the whole-model knob: set it again after)
        if config.keep_dense or config.allocation:
            self.set_capacity(**{c: getattr(config, c) for c in {**config.keep_dense, **config.allocation}})
        if config.model_allocation:
            layer_indices([s[0] for s in config.model_allocation], n, "model_allocation")
        if compute is not None:
            self.set_compute(compute)

    # -- passthrough --------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        self.adapter.check_inputs(self.model, args, kwargs)  # e.g. ViTs: image size and channels
        scorer = self.scorer
        if scorer is not None and not torch.is_grad_enabled() \
                and any(b.enabled for b in self.blocks):
            scorer.before_forward(self, args, kwargs)  # e.g. Taylor scores: a dense forward + backward
        return self.model(*args, **kwargs)

    def _note_cache_request(self, module, args, kwargs):
        """ElasticConfig.prefill: a forward that passes a KV cache or use_cache=True (generation) asks for one;
        a plain call (evaluation) does not, though transformers makes a cache for it by default."""
        asks = kwargs.get("use_cache") is True or kwargs.get("cache", kwargs.get("past_key_values")) is not None
        for b in self.blocks:
            b.cache_requested = asks

    def trace(self, *args, **kwargs) -> RoutingTrace:
        """Run one forward ``self(*args, **kwargs)`` and return what every layer's routers chose in it, by
        (layer, component) (``core.trace``); ``trace.output`` is the forward's output."""
        for b in self.blocks:  # a disabled block keeps its last decisions: none of them belong to this forward
            b.decisions = {}
        return RoutingTrace.of(self, self(*args, **kwargs))

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def blocks(self) -> list[ElasticBlock]:
        return [m for m in self.adapter.layers(self.model) if isinstance(m, ElasticBlock)]

    def router_parameters(self) -> list[nn.Parameter]:
        return [p for b in self.blocks for p in b.routers.parameters()]

    def router_state(self) -> dict[str, torch.Tensor]:
        return {f"{b.layer_idx}.{k}": v for b in self.blocks for k, v in b.routers.state_dict().items()}

    def lora_parameters(self) -> list[nn.Parameter]:
        """The LoRA factors (``ElasticConfig.lora_rank``; empty without a LoRA)."""
        return lora.parameters(self)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What ``distill`` trains: the routers, then the LoRA factors."""
        return self.router_parameters() + self.lora_parameters()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a router checkpoint holds: the routers' state and the LoRA factors ("<layer>.lora.*")."""
        return {**self.router_state(), **lora.state(self)}

    def add_lora(self, rank: int, alpha: float | None = None, targets=(), seed: int = 0) -> "ElasticModel":
        """Add a rank-``rank`` LoRA (peft) to the routed blocks, trained with the routers by ``distill``
        and saved with them; it starts at zero (B = 0), so the model is unchanged (``elastilab.core.lora``)."""
        from elastilab.core.config import check_lora
        targets = check_lora(rank, alpha, targets)
        if rank == 0:
            raise ValueError("lora_rank must be >= 1 to add a LoRA")
        lora.attach(self, rank, alpha, targets, seed)
        cfg = self.elastic_config
        cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets = rank, alpha, targets
        return self

    def parameter_summary(self) -> dict:
        """Router (and LoRA) parameters, absolute and as a fraction of the pretrained model's."""
        return summary.parameter_summary(self)

    def __repr__(self) -> str:
        return summary.describe(self)

    # -- live control -------------------------------------------------------------------------
    @property
    def capacities(self) -> dict[str, float]:
        return self.elastic_config.capacities()

    @property
    def layer_capacities(self) -> dict[str, dict[int, float]]:
        """{component: {layer: capacity}}: what each routed layer really computes (after
        ``keep_dense`` and a budget allocation), where ``capacities`` shows the one knob."""
        out: dict[str, dict[int, float]] = {}
        for b in self.blocks:
            for comp, cap in b.capacity.items():
                out.setdefault(comp, {})[b.layer_idx] = cap
        return out

    def set_capacity(self, **capacities: float) -> "ElasticModel":
        """Change capacities live (no retraining), e.g. ``set_capacity(mlp_experts=0.25)``. With an
        allocation (``set_allocation``) the value is a budget spread across layers by its schedule.
        It leaves the whole-model knob (``set_compute``): the other components stay where it put them."""
        if capacities:
            self.elastic_config.compute = None
        for name, value in capacities.items():
            value = check_capacity(name, value)
            if getattr(self.elastic_config, name) is None:
                raise ValueError(f"{name} is not elastic in this model; elastic components: "
                                 f"{', '.join(self.elastic_config.components)}")
            setattr(self.elastic_config, name, value)
            pinned = self._kept_dense(name)
            blocks = [b for b in self.blocks if name in b.capacity]
            n = len(self.adapter.layers(self.model))
            schedule = [(layer % n, cap) for layer, cap in self.elastic_config.allocation.get(name, ())]
            per_layer = capacities_at(schedule, [b.layer_idx for b in blocks], value, pinned) if schedule else {}
            for b in blocks:
                b.capacity[name] = 1.0 if b.layer_idx in pinned else per_layer.get(b.layer_idx, value)
        return self

    def set_compute(self, fraction: float) -> "ElasticModel":
        """The whole model at ``fraction`` of its dense FLOPs (measured): one knob over every routed
        component and layer, by the schedule ``el.allocate(em, task, budget="model")`` stored (saved
        with the routers). ``layer_capacities`` shows where it went (``elastilab.global_budget``)."""
        from elastilab.core.global_budget import set_compute
        return set_compute(self, fraction)

    def set_allocation(self, **schedules) -> "ElasticModel":
        """Spread each named component's capacity across layers by a schedule of (layer, capacity)
        cuts (``elastilab.core.budget.allocate`` measures one); an empty schedule returns to one capacity
        for every layer. Saved with the routers."""
        from elastilab.core.config import check_allocation
        checked = check_allocation(schedules, self.elastic_config.components)
        n = len(self.adapter.layers(self.model))
        for comp, steps in checked.items():
            layer_indices([layer for layer, _ in steps], n, f"allocation[{comp!r}]")
        self.elastic_config.allocation = {c: v for c, v in {**self.elastic_config.allocation, **checked}.items() if v}
        self.set_capacity(**{c: getattr(self.elastic_config, c) for c in checked})
        return self

    def keep_dense(self, **layers) -> "ElasticModel":
        """Always run these layers' component dense, whatever its capacity; the routers stay (and
        are saved), so ``keep_dense(mlp_tokens=())`` routes them again. E.g. token routing in
        SmolLM2-135M costs most in layers 0, 1 and the last two (notebooks/01_language.ipynb):
        ``em.keep_dense(mlp_tokens=(0, 1, -2, -1), attn_tokens=(0, 1, -2, -1))``."""
        keep = {**self.elastic_config.keep_dense, **check_keep_dense(layers, self.elastic_config.components)}
        n = len(self.adapter.layers(self.model))
        for comp, kept in keep.items():
            layer_indices(kept, n, f"keep_dense[{comp!r}]")
        self.elastic_config.keep_dense = {c: v for c, v in keep.items() if v}
        self.set_capacity(**{c: getattr(self.elastic_config, c) for c in layers})
        return self

    def _kept_dense(self, component: str) -> set[int]:
        n = len(self.adapter.layers(self.model))
        return layer_indices(self.elastic_config.keep_dense.get(component, ()), n, f"keep_dense[{component!r}]")

    def _set_option(self, name: str, value) -> "ElasticModel":
        """An ElasticConfig field every block holds a copy of (mode, skipped_tokens, attn_tokens_variant)."""
        check_family_options(ElasticConfig.from_dict({**self.elastic_config.to_dict(), name: value}),  # validates
                             self.adapter, self.model)
        setattr(self.elastic_config, name, value)
        for b in self.blocks:
            setattr(b, name, value)
        return self

    def set_mode(self, mode: str) -> "ElasticModel":
        return self._set_option("mode", mode)

    def set_skipped_tokens(self, how: str) -> "ElasticModel":
        """"drop" or "merge": what a token skipped by token routing receives (ElasticConfig.skipped_tokens)."""
        return self._set_option("skipped_tokens", how)

    def set_prefill(self, how: str) -> "ElasticModel":
        """"routed" or "dense": whether a prompt fed into a KV cache is routed or computed at capacity 1.0,
        only the decode steps after it being routed (ElasticConfig.prefill)."""
        return self._set_option("prefill", how)

    def set_attn_tokens_variant(self, variant: str) -> "ElasticModel":
        """Live switch of what a token skipped by ``attn_tokens`` leaves out of attention: "drop"
        (query, key and value) or "keep_kv" (only its query side; every token stays a key/value).
        The same routers choose in both; ``ElasticConfig.attn_tokens_variant`` documents them."""
        return self._set_option("attn_tokens_variant", variant)

    def set_backend(self, backend: str) -> "ElasticModel":
        """MLP kernels: "auto" (Triton on CUDA at inference, torch otherwise), "torch" or "triton"."""
        from elastilab_kernels.ops import BACKENDS
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        for b in self.blocks:
            b.mlp.backend = backend
        return self

    @contextmanager
    def capacity(self, **capacities: float):
        """Temporarily use other capacities (and restore them afterwards)."""
        old = {k: getattr(self.elastic_config, k) for k in capacities}
        compute = self.elastic_config.compute
        self.set_capacity(**capacities)
        try:
            yield self
        finally:
            self.set_capacity(**old)
            if compute is not None:  # back to the whole-model knob's per-layer capacities
                self.set_compute(compute)

    @property
    def scorer(self):
        """The selection method in use: None for the learned routers (see ``scoring``)."""
        blocks = self.blocks
        return blocks[0].scoring.scorer if blocks else None

    @contextmanager
    def scoring(self, scorer="learned"):
        """Choose with another selection method than the routers, e.g. ``with em.scoring("oracle"):``
        (names in ``elastilab.scorers.SCORERS``, or a ``Scorer`` instance). Yields the scorer."""
        from elastilab.scorers import get_scorer
        s = get_scorer(scorer)
        if s is not None:
            for comp in self.elastic_config.components:
                if comp in LAYER_COMPONENTS + GATED_COMPONENTS and self.capacities[comp] < 1.0:
                    s.check(self, comp)
            if self.elastic_config.mode != "topk":
                raise ValueError(f"scorer {s.name!r} chooses by top-k; set_mode('topk') first (threshold "
                                 "mode needs calibrated routers)")
        old = [b.scoring.scorer for b in self.blocks]
        for b in self.blocks:
            b.scoring.scorer = s
        try:
            yield s
        finally:
            for b, o in zip(self.blocks, old):
                b.scoring.scorer = o

    @contextmanager
    def routers_disabled(self):
        """Run the untouched pretrained blocks: the teacher, with no second copy of the weights (and
        without the LoRA, which only the routed path reads)."""
        blocks = self.blocks
        states = [b.enabled for b in blocks]
        for b in blocks:
            b.enabled = False
        try:
            yield self
        finally:
            for b, s in zip(blocks, states):
                b.enabled = s

    @contextmanager
    def training_estimator(self):
        """Forward passes with gradients use ``ElasticBlock.estimate`` (the training estimator)."""
        for b in self.blocks:
            b.estimator = True
        try:
            yield self
        finally:
            for b in self.blocks:
                b.estimator = False

    def unelastify(self) -> nn.Module:
        """Put the original blocks back and return the plain pretrained model."""
        self._cache_hook.remove()
        layers = self.adapter.layers(self.model)
        for i, m in enumerate(layers):
            if isinstance(m, ElasticBlock):
                lora.detach(m)
                layers[i] = m.base_layer
        return self.model

    # -- threshold mode -----------------------------------------------------------------------
    def calibrate(self, input_ids: torch.Tensor, batch_size: int = 4) -> "ElasticModel":
        """Fill the score-quantile table of each token router in use from sample text, so threshold mode
        keeps the target fraction (``core.calibration``)."""
        return calibrate(self, input_ids, batch_size)

    # -- checkpoints --------------------------------------------------------------------------
    def save_routers(self, path: str | os.PathLike, **metadata) -> Path:
        """Write routers.safetensors + routers.json into the folder ``path``, as a pair; ``load_routers``
        reads them back. A LoRA is saved with the routers (``checkpoint.save_routers``)."""
        return save_routers(self, path, **metadata)

    def compute_report(self, *args, **kwargs):
        from elastilab.core.compute import compute_report
        return compute_report(self, *args, **kwargs)


def elastify(model: nn.Module, config: ElasticConfig | None = None, **capacities) -> ElasticModel:
    """Wrap ``model`` with routers: ``elastify(model, ElasticConfig(mlp_experts=0.5))`` or
    ``elastify(model, mlp_tokens=0.5)``."""
    if config is None:
        config = ElasticConfig(**capacities)
    elif capacities:
        raise TypeError("pass either an ElasticConfig or capacities as keywords, not both")
    if isinstance(model, ElasticModel):
        raise TypeError("model is already elastic; call .unelastify() first to re-wrap it")
    return (find_adapter(model).elastic_class or ElasticModel)(model, config)  # e.g. elastic_llava.ElasticLlava
