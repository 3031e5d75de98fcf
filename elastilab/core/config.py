"""ElasticConfig: which parts of each layer are elastic, and how much of them is computed."""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field, fields

from elastilab.core import components

#: Components a layer can route (the table: ``core.components``). ``visual_tokens``: visual-language models only.
TOKEN_COMPONENTS = components.names("tokens")
PARAM_COMPONENTS = components.names("params")
#: the components with a learned router in each layer
LAYER_COMPONENTS = TOKEN_COMPONENTS + PARAM_COMPONENTS
#: per-layer components without a router: single MLP hidden units chosen by the MLP's own gate (CATS)
GATED_COMPONENTS = components.names("gated")
#: chosen once for the whole language model: a VLM's image tokens
VISUAL_COMPONENTS = components.names("visual")
COMPONENTS = tuple(components.COMPONENTS)
MODES = ("topk", "threshold", "running")
#: what a token skipped by ``attn_tokens`` routing leaves out of that layer's attention
ATTN_TOKENS_VARIANTS = ("drop", "keep_kv")
SKIPPED_TOKENS = ("drop", "merge")
PREFILL = ("routed", "dense")
PARTITIONS = ("contiguous", "clustered")


def check_capacity(name: str, value) -> float:
    if name not in COMPONENTS + ("compute",):
        raise ValueError(f"unknown component {name!r}; allowed: {', '.join(COMPONENTS)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"capacity of {name} must be a number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"capacity of {name} must be in (0, 1], got {value}")
    return float(value)


@dataclass
class ElasticConfig:
    """What to make elastic. A component left at ``None`` is not routed (no router is created).

    Capacities are the fraction computed of what each component chooses (``core.components``: tokens,
    query heads, MLP slices or MLP hidden units).
    They can be changed later with ``ElasticModel.set_capacity`` without retraining.
    """

    attn_tokens: float | None = None
    mlp_tokens: float | None = None
    attn_heads: float | None = None
    mlp_experts: float | None = None
    #: single hidden units per token, chosen by the size of the gate activations the MLP computes
    #: anyway (CATS-style: no router; the up and down projections run for the chosen units only)
    mlp_units: float | None = None
    visual_tokens: float | None = None
    #: number of slices the MLP hidden units are split into (must divide the MLP width)
    n_experts: int = 8
    #: "contiguous" slices, or "clustered": hidden units permuted by balanced k-means first
    expert_partition: str = "contiguous"
    #: "topk": exactly ceil(c*T) tokens per sequence (looks at the whole sequence);
    #: "threshold": a token is kept when its score passes a calibrated per-layer threshold
    #: (causal: usable for generation with a KV cache);
    #: "running": threshold mode whose bar is the quantile of the sequence's own scores so far (causal
    #: too), so the compute follows the capacity on text unlike the calibration text
    mode: str = "topk"
    #: ``attn_tokens`` routing: "drop" (Mixture-of-Depths: a skipped token is neither query nor
    #: key/value in that layer, so later tokens cannot see it there) or "keep_kv" (FlexiDepth: every
    #: token still offers its key and value, only a skipped token's query side is not computed: its
    #: q projection, scores, weighted values and o projection). Checkpoints saved before this field
    #: existed load as "drop"; ``ElasticModel.set_attn_tokens_variant`` changes it live.
    attn_tokens_variant: str = "drop"
    #: what a token skipped by attn_tokens / mlp_tokens receives: "drop" (nothing: its residual stream
    #: passes unchanged) or "merge" (the sub-layer output of its most similar kept token, by cosine of
    #: the normalised inputs; vision transformers only, since a causal model would need a kept token
    #: from its own past within each chunk). Routers trained with "merge" (``elastilab vit train
    #: --skipped-tokens merge``) learn which tokens can be merged; any routers can be switched live.
    #: ``ElasticModel.set_skipped_tokens`` changes it live.
    skipped_tokens: str = "drop"
    #: a forward of more than one new token per sequence that asks for a KV cache (passes one, or use_cache=True:
    #: a prompt of generation; a plain ``em(ids)`` does not ask, though transformers makes one): "routed" like every
    #: forward, or "dense": every component at capacity 1.0 for it (the pretrained model's values and FLOPs)
    #: and only the decode steps after it routed.
    #: Per-token unit and head choices defeat the batched matmuls of a long prompt on a CPU (bench decode:
    #: prefill is slower routed than dense), so "dense" trades the prompt's saved compute for its time.
    #: Perplexity stays routed. ``ElasticModel.set_prefill`` changes it live.
    prefill: str = "routed"
    #: layers left dense (e.g. the first and last); negative indices count from the end
    dense_layers: tuple[int, ...] = field(default_factory=tuple)
    #: {component: layers} that keep their routers but always run that component dense, whatever
    #: the capacity (``ElasticModel.keep_dense``); negative indices count from the end
    keep_dense: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: {component: [(layer, capacity), ...]}: a compute budget allocated across layers
    #: (``elastilab.core.budget``). The component's capacity is then the budget, the mean capacity over
    #: its routed layers, and the layers take the schedule's cuts in order until the mean reaches it
    allocation: dict[str, tuple[tuple[int, float], ...]] = field(default_factory=dict)
    #: [(layer, component, capacity, whole-model compute after the cut), ...]: one compute budget over
    #: every routed component and layer (``elastilab.global_budget``; ``ElasticModel.set_compute``)
    model_allocation: tuple[tuple[int, str, float, float], ...] = ()
    #: the whole-model compute knob in use (a fraction of the dense FLOPs), or None: the component knobs
    compute: float | None = None
    #: rank of the LoRA (peft) trained with the routers on the projections of every routed block
    #: (``elastilab.core.lora``); 0: none. ``routers_disabled()`` stays the pretrained model exactly
    lora_rank: int = 0
    #: LoRA scaling numerator (the update is lora_alpha / lora_rank * B @ A); None: lora_rank (scale 1)
    lora_alpha: float | None = None
    #: names of the adapted projections (e.g. ("q_proj", "v_proj")); empty: every linear projection
    lora_targets: tuple[str, ...] = ()

    def __post_init__(self):
        for name in COMPONENTS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, check_capacity(name, value))
        if not self.components:
            raise ValueError("ElasticConfig enables no component; set a capacity for at least one of "
                             f"{', '.join(COMPONENTS)}")
        if isinstance(self.n_experts, bool) or not isinstance(self.n_experts, int) or self.n_experts < 1:
            raise ValueError(f"n_experts must be a positive integer, got {self.n_experts!r}")
        if self.expert_partition not in PARTITIONS:
            raise ValueError(f"expert_partition must be one of {PARTITIONS}, got {self.expert_partition!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.attn_tokens_variant not in ATTN_TOKENS_VARIANTS:
            raise ValueError(f"attn_tokens_variant must be one of {ATTN_TOKENS_VARIANTS}, "
                             f"got {self.attn_tokens_variant!r}")
        if self.skipped_tokens not in SKIPPED_TOKENS:
            raise ValueError(f"skipped_tokens must be one of {SKIPPED_TOKENS}, got {self.skipped_tokens!r}")
        if self.prefill not in PREFILL:
            raise ValueError(f"prefill must be one of {PREFILL}, got {self.prefill!r}")
        self.dense_layers = layer_list(self.dense_layers, "dense_layers")
        self.keep_dense = check_keep_dense(self.keep_dense, self.components)
        self.allocation = check_allocation(self.allocation, self.components)
        self.lora_targets = check_lora(self.lora_rank, self.lora_alpha, self.lora_targets)
        self.model_allocation = check_model_allocation(self.model_allocation, self.components)
        if self.compute is not None:
            if not self.model_allocation:
                raise ValueError("compute (the whole-model knob) needs a model_allocation (el.allocate(em, task, "
                                 "budget='model'))")
            self.compute = check_capacity("compute", self.compute)

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if getattr(self, c) is not None)

    def capacities(self) -> dict[str, float]:
        return {c: getattr(self, c) for c in self.components}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dense_layers"] = list(self.dense_layers)
        d["keep_dense"] = {c: list(v) for c, v in self.keep_dense.items()}
        d["allocation"] = {c: [list(step) for step in v] for c, v in self.allocation.items()}
        d["lora_targets"] = list(self.lora_targets)
        d["model_allocation"] = [list(step) for step in self.model_allocation]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ElasticConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ElasticConfig fields {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**{**d, "dense_layers": tuple(d.get("dense_layers", ()))})


def check_lora(rank, alpha, targets) -> tuple[str, ...]:
    """Validate the LoRA fields; returns the targets as a tuple of names."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 0:
        raise ValueError(f"lora_rank must be an integer >= 0 (0: no LoRA), got {rank!r}")
    ok = alpha is None or (isinstance(alpha, numbers.Real) and not isinstance(alpha, bool)
                           and 0 < alpha < float("inf"))
    if not ok:
        raise ValueError(f"lora_alpha must be a finite number > 0, or None (= lora_rank: scale 1), got {alpha!r}")
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"lora_targets must be a list of projection names such as ['q_proj', 'v_proj'], "
                         f"got {targets!r}")
    if rank == 0 and (alpha is not None or targets):
        raise ValueError("lora_alpha and lora_targets configure a LoRA: give lora_rank >= 1 with them")
    return tuple(targets)


def check_keep_dense(keep: dict, components) -> dict[str, tuple[int, ...]]:
    """{component: layer indices} -> validated, with tuples of ints."""
    if not isinstance(keep, dict):
        raise ValueError(f"keep_dense must be a dict {{component: layers}}, got {type(keep).__name__}")
    out = {}
    for comp, layers in keep.items():
        if comp not in components:
            raise ValueError(f"keep_dense names {comp!r}, which is not elastic here; elastic components: "
                             f"{', '.join(components)}")
        out[comp] = tuple(sorted(set(layer_list(layers, f"keep_dense[{comp!r}]"))))
    return out


def check_allocation(allocation: dict, components) -> dict[str, tuple[tuple[int, float], ...]]:
    """{component: [(layer, capacity), ...]} -> validated, as tuples (``elastilab.core.budget``)."""
    if not isinstance(allocation, dict):
        raise ValueError(f"allocation must be a dict {{component: [(layer, capacity), ...]}}, "
                         f"got {type(allocation).__name__}")
    out = {}
    for comp, steps in allocation.items():
        if comp not in components or comp not in LAYER_COMPONENTS + GATED_COMPONENTS:
            raise ValueError(f"allocation names {comp!r}, which is not an elastic layer component here; "
                             f"elastic components: {', '.join(components)}")
        try:
            pairs = [(layer, value) for layer, value in steps]
        except (TypeError, ValueError):
            raise ValueError(f"allocation[{comp!r}] must be a list of (layer, capacity) pairs") from None
        layers = layer_list([layer for layer, _ in pairs], f"allocation[{comp!r}] layers")
        out[comp] = tuple((layer, check_capacity(comp, value)) for layer, (_, value) in zip(layers, pairs))
    return out


def check_model_allocation(steps, components) -> tuple[tuple[int, str, float, float], ...]:
    """[(layer, component, capacity, compute after the cut), ...] -> validated tuples (``global_budget``)."""
    if isinstance(steps, (str, bytes, dict)) or not hasattr(steps, "__iter__"):
        raise ValueError(f"model_allocation must be a list of (layer, component, capacity, compute) steps, "
                         f"got {steps!r:.80}")
    out = []
    for step in steps:
        try:
            layer, comp, cap, compute = step
        except (TypeError, ValueError):
            raise ValueError(f"model_allocation steps must be (layer, component, capacity, compute), got "
                             f"{step!r:.80}") from None
        if comp not in components or comp not in LAYER_COMPONENTS + GATED_COMPONENTS:
            raise ValueError(f"model_allocation cuts {comp!r}, which is not an elastic layer component here; "
                             f"elastic components: {', '.join(components)}")
        (layer,) = layer_list([layer], "model_allocation layers")
        out.append((layer, comp, check_capacity(comp, cap), check_capacity("compute", compute)))
    return tuple(out)


def layer_list(layers, what: str) -> tuple[int, ...]:
    """A list of integer layer indices (a float such as 1.7 is refused, not rounded); the range is
    checked where the number of layers is known (``layer_indices``)."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"{what} must be a list of layer indices, got {layers!r}")
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise ValueError(f"{what} must be a list of integer layer indices, got {layers!r}")
        out.append(int(i))
    return tuple(out)


def layer_indices(indices, n: int, what: str) -> set[int]:
    """Layer indices (negative ones count from the end) as a set in [0, n); out of range raises."""
    out = set()
    for i in indices:
        if not -n <= i < n:
            raise ValueError(f"{what} names layer {i}, but the model has {n} layers "
                             f"(allowed: 0..{n - 1}, or -{n}..-1 from the end)")
        out.add(i % n)
    return out
