"""ElasticBlock: wraps one pretrained transformer block (kept as ``base_layer``) and runs it routed."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from elastilab.core.estimator import estimate
from elastilab.core.lora import effective_weights
from elastilab.core.routers import Router
from elastilab.core.routing import (
    RoutedAttention,
    RoutedMLP,
    choose_slots,
    gathers,
    keep_to_index,
    n_kept,
    running_threshold,
    scatter_add_rows,
    select_tokens,
    straight_through,
)
from elastilab.core.trace import RoutingDecision
from elastilab.core.unit_plan import UnitPlan
from elastilab.scorers import Candidates, Scoring, merge_rows, nearest_kept, unmerge
from elastilab_kernels.ops import unit_up_is_whole


class ElasticBlock(nn.Module):
    """One block with routers. Disabled, it calls the untouched base layer (the teacher).

    Enabled, it runs the same math from the adapter's ``BlockSpec`` views of the frozen weights:
    attention on the chosen tokens / heads, MLP on the chosen tokens / hidden-unit slices, and
    skipped tokens carried by the residual stream unchanged.
    """

    def __init__(self, base_layer: nn.Module, adapter, layer_idx: int, components: dict[str, float],
                 n_experts: int, mode: str, unit_order: Tensor | None = None, attn_tokens_variant: str = "drop",
                 skipped_tokens: str = "drop", prefill: str = "routed"):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.layer_idx = layer_idx
        spec = adapter.block_spec(base_layer, layer_idx)
        d, H = spec.attn.w_q.shape[1], spec.attn.n_heads
        if "mlp_experts" in components and spec.mlp.width % n_experts:
            raise ValueError(f"n_experts={n_experts} does not divide the MLP width {spec.mlp.width} "
                             f"of layer {layer_idx}; use a divisor of {spec.mlp.width}")
        sizes = {"attn_tokens": 1, "mlp_tokens": 1, "attn_heads": H, "mlp_experts": n_experts}
        # mlp_units has no router: the MLP's own gate activations choose (CATS)
        self.routers = nn.ModuleDict({c: Router(d, sizes[c]) for c in components if c in sizes})
        self.capacity = dict(components)
        self.n_experts = n_experts
        self.mode = mode
        #: "drop": tokens skipped by attn_tokens are not keys/values either; "keep_kv": they are
        self.attn_tokens_variant = attn_tokens_variant
        self.skipped_tokens = skipped_tokens  # "drop" or "merge" (ElasticConfig.skipped_tokens)
        self.prefill = prefill  # "routed" or "dense" (ElasticConfig.prefill)
        self.cache_requested = False  # whether the model's current forward asked for a KV cache (a prompt)
        self.enabled = True
        self.attn = RoutedAttention(layer_idx)
        self.mlp = RoutedMLP()
        self.scoring = Scoring()  # another selection method than the routers (ElasticModel.scoring)
        self._permuted = None  # (weights' identity, the permuted MLPWeights) of clustered experts
        self._copies: dict = {}  # {weight name: (its identity, unit-major copy)} for decoding (_transposed)
        self._weight_modules = None  # the base layer's modules that hold parameters (_spec's key)
        self._built = None  # (the weights' identity, the BlockSpec built from them): _spec
        self.lora: dict = {}  # {name in base_layer: peft LoRA layer}, set by elastilab.core.lora.attach
        self._lora_cache = None  # (factors' identity, stamp, {projection: W + ΔW}) built without a gradient
        if unit_order is not None:  # clustered experts: the MLP with its hidden units reordered
            self.register_buffer("unit_order", unit_order, persistent=False)
        else:
            self.unit_order = None
        self._seen: dict = {}   # running mode: this sequence's scores so far, per component [B, S]
        self.decisions: dict = {}  # {component: RoutingDecision} of the last forward (core.trace)
        self.counts: dict = {}  # sizes the last forward computed, for the analytic FLOP count
        #: training: forward values of the routed path, gradients for unchosen rows too (see estimate)
        self.estimator = False
        #: {} while Taylor scores are measured: estimate() runs dense with all-ones gates it stores here
        self.probe: dict | None = None

    # -- helpers -------------------------------------------------------------------------------
    def _active(self, comp: str) -> bool:
        return comp in self.capacity and self.capacity[comp] < 1.0

    def _units(self, h: Tensor, rows: Tensor | None) -> tuple[float, Tensor | None] | None:
        """mlp_units: (capacity, scores of the rows' hidden units, or None: their gate activations); rows: their
        places in the flattened batch (None: every row)."""
        if not self._active("mlp_units"):
            return None
        if self._active("mlp_experts"):
            raise ValueError("mlp_experts and mlp_units are both below capacity 1.0: choose one MLP granularity "
                             "(slices with a router, or single units by their gate)")
        if self.scoring.scorer is None:
            return self.capacity["mlp_units"], None
        rows = torch.arange(h.shape[0], device=h.device) if rows is None else rows
        scores = self.scoring(Candidates(self, "mlp_units", h, rows))
        return self.capacity["mlp_units"], scores

    def _scores(self, comp: str, h: Tensor, rows: Tensor, **where) -> Tensor:
        """Scores of the candidates of ``comp`` for the rows h: the router's, or the scorer's."""
        if self.scoring.scorer is None:
            return self.routers[comp](h)
        return self.scoring(Candidates(self, comp, h, rows, **where))

    def _merged(self) -> Tensor | None:
        """After a merging scorer (ToMe) chose: the token each token merges into [B, T], else None."""
        scorer = self.scoring.scorer
        return None if scorer is None else scorer.merged_into()

    def _receives(self, h: Tensor, keep: Tensor) -> Tensor | None:
        """With skipped_tokens="merge": the kept token whose output each token receives [B, T]."""
        return nearest_kept(h, keep) if self.skipped_tokens == "merge" else None

    def _token_keep(self, comp: str, h: Tensor, n_protected: int, start: int = 0, **where) -> tuple[Tensor, Tensor]:
        B, T = h.shape[:2]
        rows = torch.arange(B * T, device=h.device).view(B, T)
        scores = self._scores(comp, h, rows, **where)
        threshold = None
        if self.mode != "topk":
            router = self.routers[comp]
            if not router.calibrated:
                raise RuntimeError(f"layer {self.layer_idx} {comp} router is not calibrated for {self.mode} "
                                   "mode; call ElasticModel.calibrate(input_ids) first (or use mode='topk')")
            threshold = router.threshold(self.capacity[comp])
            if self.mode == "running":  # each sequence's own past scores set the bar (causal)
                past = self._seen.get(comp) if start > 0 else None
                threshold, self._seen[comp] = running_threshold(past, scores[:, n_protected:].detach(),
                                                                self.capacity[comp], threshold)
        keep = select_tokens(scores, self.capacity[comp], threshold, n_protected)
        self.decisions[comp] = RoutingDecision(self.layer_idx, comp, scores, keep)
        return scores, keep

    def _transposed(self, name: str, t: Tensor) -> Tensor:
        """A contiguous copy of t.T (rows = hidden units or head dims: what the decode gather paths
        read), made once per weight version. It costs that weight's memory again, only once decoded."""
        key = (t.data_ptr(), t._version, t.dtype, t.device)
        hit = self._copies.get(name)
        if hit is None or hit[0] != key:
            hit = self._copies[name] = (key, t.detach().t().contiguous())
        return hit[1]

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if not self.enabled:
            return self.base_layer(*args, **kwargs)
        call = self.adapter.parse_call(args, kwargs)
        if self.estimator and torch.is_grad_enabled():
            if call.cache is not None or self._padded(call.mask):
                raise ValueError("router training takes unpadded batches without a KV cache "
                                 "(pass input_ids only, use_cache=False)")
            out = estimate(self, call.hidden, call.rope)
        elif self.prefill == "dense" and self.cache_requested and call.cache is not None and call.hidden.shape[1] > 1:
            capacity, self.capacity = self.capacity, {}  # a prompt: every component dense (ElasticConfig.prefill)
            try:
                out = self.routed(call.hidden, call.mask, call.cache, call.rope)
            finally:
                self.capacity = capacity
        else:
            out = self.routed(call.hidden, call.mask, call.cache, call.rope)
        return self.adapter.pack_output(out, args, kwargs)

    def _padded(self, mask) -> bool:
        """Whether the model's mask hides more than causality and the sliding window do (padding)."""
        mask = self.adapter.bool_mask(mask)
        if mask is None:
            return False
        pos = torch.arange(mask.shape[-2], device=mask.device)[None]
        seen = self.adapter.block_spec(self.base_layer, self.layer_idx).attn.visible(pos, pos)
        return seen is None or mask.shape[-1] != pos.shape[1] or not bool((mask == seen[:, None]).all())

    def _spec(self):
        """The adapter's views of the block's weights, built again only when a weight changed (in place, or a
        parameter replaced) or the LoRA did: reading them through the modules costs about 0.3 ms, which
        is a tenth of a 135 M model's decode step per layer. (A submodule swapped for another is not seen.)"""
        with effective_weights(self) as stamp:  # with a LoRA, the spec holds views of W + ΔW
            if self._weight_modules is None:
                self._weight_modules = [m for m in self.base_layer.modules() if m._parameters]
            key = (stamp, *((t.data_ptr(), t._version) for m in self._weight_modules
                            for t in m._parameters.values() if t is not None))
            if self._built is not None and self._built[0] == key:
                spec = self._built[1]
                spec.attn.w_o_t = spec.mlp.w_out_t = None  # the decode copies are set per forward (routed)
                return spec
            spec = self.adapter.block_spec(self.base_layer, self.layer_idx)
        if self.unit_order is not None:  # permuted once; again only if the base weights (or the LoRA) changed
            key = (stamp, *((t.data_ptr(), t._version, t.device) for t in (spec.mlp.w_in, spec.mlp.w_out)))
            if self._permuted is None or self._permuted[0] != key:
                self._permuted = (key, spec.mlp.permuted(self.unit_order))
            spec.mlp = self._permuted[1]
        self._built = (key, spec)
        return spec

    def routed(self, x: Tensor, mask: Tensor | None, cache, rope) -> Tensor:
        """The execution users run: only chosen tokens, heads and slices are computed."""
        spec = self._spec()
        B, T, d = x.shape
        self.decisions, counts = {}, {"B": B, "T": T}
        start = 0
        if cache is not None:  # layer 0 caches every token, so its length counts the tokens seen
            start = cache.get_seq_length(0) - (T if self.layer_idx > 0 else 0)
        if start > 0 and self.mode == "topk" and (self._active("attn_tokens") or self._active("mlp_tokens")):
            raise ValueError("token routing in mode 'topk' cannot decode with a KV cache: top-k over the new "
                             "token(s) alone would keep them (every step dense); use em.set_mode('threshold') "
                             "or 'running' with calibrated routers (em.calibrate) for generation")
        pos = torch.arange(start, start + T, device=x.device).expand(B, T)
        protected = min(T, max(0, spec.n_protected - start))  # protected positions in this chunk
        if rope is not None:  # models compute cos/sin once for the batch: [1, T, hd]
            rope = tuple(r.expand(B, -1, -1) for r in rope)

        # attention sub-layer: chosen tokens (all, padded to the longest row) and chosen heads
        h = spec.attn_norm(x)
        keys = merged = None  # rows offering keys/values when they are not the query rows; ToMe groups
        if self._active("attn_tokens"):
            scores, keep = self._token_keep("attn_tokens", h, protected, start, pos=pos, rope=rope)
            if (merged := self._merged()) is not None:  # the kept tokens stand for their groups
                h, attn_keep = merge_rows(h, merged), keep
            elif (merged := self._receives(h, keep)) is not None:
                attn_keep = keep
            idx, valid = keep_to_index(keep)
            take = lambda t: torch.gather(t, 1, idx.view(B, -1, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))
            if self.attn_tokens_variant == "keep_kv":  # every token is a key/value; chosen ones query
                keys = (h, pos, rope)
            h, pos, gate = take(h), take(pos), straight_through(take(scores))
            rope = None if rope is None else (take(rope[0]), take(rope[1]))
        else:
            idx, valid, gate, take = None, torch.ones(B, T, dtype=torch.bool, device=x.device), None, None
        pad_mask = self.adapter.bool_mask(mask)
        if pad_mask is not None and spec.attn.window is not None and pad_mask.shape[-1] < start + T:
            # a sliding layer's mask covers its window only: its columns end at this chunk's last position;
            # older positions are outside the window anyway (AttnWeights.visible), so False
            pad_mask = torch.cat([pad_mask.new_zeros(*pad_mask.shape[:-1], start + T - pad_mask.shape[-1]),
                                  pad_mask], -1)
        if pad_mask is not None:
            pad_mask = pad_mask[:, 0] if take is None else take(pad_mask[:, 0])
        heads = None
        if self._active("attn_heads"):
            rows = (pos - start) + T * torch.arange(B, device=x.device)[:, None]  # each row's place in B x T
            hs = self._scores("attn_heads", h, rows, pos=pos, rope=rope, valid=valid)
            heads = choose_slots(hs, self.capacity["attn_heads"])
            self.decisions["attn_heads"] = RoutingDecision(self.layer_idx, "attn_heads", hs[valid], heads[0][valid])
            if gathers(heads[0].shape[0] * heads[0].shape[1]):  # decoding: each row its own heads, no padding
                spec.attn.w_o_t = self._transposed("w_o", spec.attn.w_o)
                counts["head_pairs"] = heads[0].numel()
            else:  # (token, head) pairs computed: per head, every batch row is padded to the row that
                # chose it most often (kernels/head_attention.py groups by head); exact for B = 1
                per_row = torch.zeros(*heads[0].shape[:2], spec.attn.n_heads, dtype=torch.bool,
                                      device=x.device).scatter_(-1, heads[0], True).sum(1)
                counts["head_pairs"] = B * int(per_row.max(0).values.sum())
        y = self.attn(spec.attn, h, pos, valid, rope, pad_mask, cache, heads, keys, start)
        attn_rows = valid.numel() if idx is None else int(valid.sum())  # (no sync when every row is valid)
        counts.update(attn_rows=attn_rows, attn_rows_padded=valid.numel(), keys=self.attn.last_keys,
                      kv_rows=B * T if keys is not None else attn_rows)
        y = spec.attn_out(y)  # post-norm (Gemma), LayerScale (DINOv2)
        if idx is None:
            x = x + y
        elif merged is not None:  # every token receives its group's output
            x = x + unmerge(y[valid], attn_keep, merged).view(B, T, d)
        else:
            flat = (idx + torch.arange(B, device=x.device)[:, None] * T)[valid]
            x = scatter_add_rows(x.reshape(B * T, d), flat, (y * gate[..., None])[valid]).view(B, T, d)

        # MLP sub-layer: chosen rows of the flattened batch (no padding needed) and chosen slices
        x = x.reshape(B * T, d)
        h_all = spec.mlp_norm(x)
        h, rows, gate = h_all, None, None
        merged = None
        if self._active("mlp_tokens"):
            scores, keep = self._token_keep("mlp_tokens", h_all.view(B, T, d), protected, start)
            rows = keep.reshape(-1).nonzero().squeeze(1)
            if (merged := self._merged()) is not None:  # the kept tokens stand for their groups
                h_all = merge_rows(h_all.view(B, T, d), merged).view(B * T, d)
            else:
                merged = self._receives(h_all.view(B, T, d), keep)
            h, gate = h_all[rows], straight_through(scores.reshape(-1)[rows])
        experts = None
        if self._active("mlp_experts"):
            es = self._scores("mlp_experts", h, torch.arange(B * T, device=x.device) if rows is None else rows)
            experts = choose_slots(es, self.capacity["mlp_experts"])
            self.decisions["mlp_experts"] = RoutingDecision(self.layer_idx, "mlp_experts", es, experts[0])
            counts["expert_pairs"] = experts[0].numel()
        units = self._units(h, rows)
        if units is not None:
            counts["unit_pairs"] = h.shape[0] * n_kept(units[0], spec.mlp.width)
            if isinstance(units[1], UnitPlan):  # chosen before the gate: only the plan's units are computed
                counts.update(unit_mats=units[1].mlp_mats(spec.mlp), scoring=units[1].scoring_flops)
        # decoding: the down projection reads only the chosen units' rows of a unit-major copy
        spec.mlp.w_out_t = self._transposed("w_out", spec.mlp.w_out) if units and gathers(h.shape[0]) else None
        if units and unit_up_is_whole(spec.mlp, h, self.mlp.backend):
            counts["unit_whole_up"] = True
        counts["mlp_rows"] = h.shape[0]
        self.counts = counts
        if rows is not None and experts is None and units is None and spec.ls2 is None \
                and spec.post_mlp_norm is None and merged is None:
            x = self.mlp(spec.mlp, h_all, residual=(x, rows, gate))  # gather, MLP, residual add: fused
        else:
            y = self.mlp(spec.mlp, h, experts, self.n_experts, units=units)
            y = spec.mlp_out(y)
            if merged is not None:  # every token receives its group's output
                x = x + unmerge(y, keep, merged)
            else:
                x = x + y if rows is None else scatter_add_rows(x, rows, y * gate[:, None])
        return x.view(B, T, d)
