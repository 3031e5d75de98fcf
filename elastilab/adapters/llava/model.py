"""Elastic LLaVA: one tiny router chooses which image tokens the language model sees.

``visual_tokens`` is a single ``Router(d_lm, 1)`` (Linear(d_lm, 1)) scoring the projected image tokens at
the language model's input (as its first layer sees them, after the input RMSNorm). The top
``ceil(c * N)`` tokens of each image are kept, in order; the others are *removed from the sequence*,
so every LM layer (and the KV cache) holds fewer tokens. Kept tokens keep their original positions
(RoPE sees the same relative distances as in the full model), the 2-D attention mask is gathered the
same way, and decoding continues from the original length.

The LM's per-layer components wrap the inner LlamaModel through the llama adapter, exactly as for a
text LM:

    model, tok = el.zoo.load("tiny-llava")
    em = el.elastify(model, el.ElasticConfig(visual_tokens=0.5))      # an ElasticLlava
    batch = build_inputs(tok, "What digit is this?", digit_image)
    em.generate(**batch, max_new_tokens=3)                               # KV cache, dropped tokens
    with em.scoring("fastv"):                                            # baselines: "random", "fastv"
        em.generate(**batch, max_new_tokens=3)

The baselines are scorers of ``visual_tokens`` (``elastilab.scorers``): one whose ``image_layer`` is 0
(random) scores the image tokens at the LM's input, one whose ``image_layer`` is K >= 1 (FastV) scores
them from LM layer K-1's input and prunes from layer K on. Training (self-distillation, KL on the answer
tokens; ``elastilab.tasks.vlm``) keeps every token but gates the image tokens' keys inside attention;
that and the pruning inside the LM are in ``lm.py``. ``elastify`` wraps a LLaVA in ``ElasticLlava``
through the llava adapter, whose ``elastic_class`` this module sets (it builds on ElasticModel;
elastic imports the adapters, so the adapter cannot import this module).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from elastilab.adapters.llava.adapter import LlavaAdapter
from elastilab.adapters.llava.lm import cache_kwarg, gated_attention, prune_after, top_per_image
from elastilab.adapters.llava.lm_routers import load_lm_routers  # noqa: F401  (notebook 03 imports it from here)
from elastilab.adapters.vit import check_finite
from elastilab.core.config import GATED_COMPONENTS, LAYER_COMPONENTS
from elastilab.core.model import ElasticModel
from elastilab.core.routers import Router
from elastilab.core.routing import hard_gates, keep_to_index, n_kept
from elastilab.scorers import SCORERS, Candidates, get_scorer

#: who chooses the image tokens (``ElasticLlava.selector``): the router, or a visual_tokens scorer
SELECTORS = ("router", *(n for n, s in SCORERS.items() if "visual_tokens" in s.components))


@dataclass
class VLMOutput:
    logits: Tensor
    past_key_values: object = None
    kept_positions: Tensor | None = None  #: [B, T'] original index of each token the LM saw
    image_keep: Tensor | None = None      #: [n_images, N] bool, the image tokens kept
    next_position: Tensor | None = None   #: [B] position id of the next token (for decoding)


class ElasticLlava(ElasticModel):
    """An ElasticModel for ``LlavaForConditionalGeneration``: LM components in the blocks of the inner
    language model, plus the ``visual_tokens`` router (kept outside the wrapped model, like the block
    routers it is the only thing that trains). The image tokens are chosen by the router, or by the
    ``visual_scorer`` that ``scoring()`` sets: "random" (seeded, training-free) or "fastv" (training-free:
    after LM layer ``fastv_layer``, keep the image tokens that received the most attention from the text
    that follows the image)."""

    def __init__(self, model, config, adapter=None):
        super().__init__(model, config, adapter)
        self.visual_router = None
        if config.visual_tokens is not None:
            self.visual_router = Router(model.config.text_config.hidden_size, 1)
            self.visual_router.requires_grad_(True)
        self.visual_scorer = None  #: a Scorer of visual_tokens; None: the router
        self.fastv_layer = 2       #: FastV's K when its scorer does not set one
        self._visual_off = False
        self._estimating = False

    # -- routers and state -----------------------------------------------------------------------
    def router_parameters(self):
        router = getattr(self, "visual_router", None)  # (ElasticModel.__init__ asks before it exists)
        own = [] if router is None else list(router.parameters())
        return super().router_parameters() + own

    def router_state(self):
        state = super().router_state()
        if getattr(self, "visual_router", None) is not None:
            state.update({f"visual.{k}": v for k, v in self.visual_router.state_dict().items()})
        return state

    def visual_parameter_fraction(self) -> dict:
        """The visual router's parameters against the whole LLaVA (tower + projector + LM)."""
        n = 0 if self.visual_router is None else sum(p.numel() for p in self.visual_router.parameters())
        base = self.parameter_summary()["base_params"]
        return {"visual_router_params": n, "base_params": base, "fraction": n / base}

    @contextlib.contextmanager
    def routers_disabled(self):
        with super().routers_disabled():
            old, self._visual_off = self._visual_off, True
            try:
                yield self
            finally:
                self._visual_off = old

    @contextlib.contextmanager
    def training_estimator(self):
        with super().training_estimator():
            self._estimating = True
            try:
                yield self
            finally:
                self._estimating = False

    @contextlib.contextmanager
    def scoring(self, scorer="learned"):
        """As ``ElasticModel.scoring``, image tokens included: a scorer of visual_tokens ("random",
        "fastv") chooses them, the router ("learned") otherwise; one of visual_tokens only (FastV) leaves
        the LM components to their routers. Yields the scorer."""
        s = get_scorer(scorer)
        if s is not None and self.visual_capacity < 1.0:
            s.check(self, "visual_tokens")
        visual = s if s is not None and "visual_tokens" in s.components else None
        lm = s if s is not None and set(s.components) & set(LAYER_COMPONENTS + GATED_COMPONENTS) else None
        old, self.visual_scorer = self.visual_scorer, visual
        try:
            with super().scoring(lm):
                yield s
        finally:
            self.visual_scorer = old

    @property
    def selector(self) -> str:
        """Who chooses the image tokens: "router", or the visual scorer's name (as records name them)."""
        return "router" if self.visual_scorer is None else self.visual_scorer.name

    @selector.setter
    def selector(self, name: str) -> None:
        if name not in SELECTORS:
            raise ValueError(f"selector must be one of {SELECTORS}, got {name!r}")
        self.visual_scorer = None if name == "router" else get_scorer(name)

    def _image_layer(self) -> int:
        """The first LM layer that sees only the kept image tokens (0: they are chosen before the LM)."""
        return 0 if self.visual_scorer is None or self.visual_capacity >= 1.0 else self.visual_scorer.image_layer(self)

    @property
    def visual_capacity(self) -> float:
        c = self.elastic_config.visual_tokens
        return 1.0 if (c is None or self._visual_off) else c

    # -- the image tokens ------------------------------------------------------------------------
    def image_features(self, pixel_values: Tensor) -> Tensor:
        """Vision tower + projector: [n_images, N, d_lm]."""
        check_finite(pixel_values, "pixel_values")
        cfg = self.model.config
        out = self.model.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats

    def router_input(self, feats: Tensor) -> Tensor:
        """The image tokens as the first LM layer sees them: after its input RMSNorm. (Projected
        features have norms ~100x a word embedding's; unnormalised, a linear score saturates the
        straight-through sigmoid within a few steps and the ranking freezes.)"""
        layer = self.adapter.layers(self.model)[0]
        return self.adapter.block_spec(getattr(layer, "base_layer", layer), 0).attn_norm(feats)

    def image_candidates(self, h: Tensor, rows: Tensor, mask: Tensor, pos: Tensor, rope=None,
                         layer: int = 0) -> Candidates:
        """What a visual_tokens scorer whose ``image_layer`` is ``layer`` sees: the sequence h [B, T, d] as LM
        layer max(layer - 1, 0) receives it (and that layer's spec), the flat index of each image's tokens
        rows [n_images, N], the mask, positions and rotary tables."""
        lm_layer = self.adapter.layers(self.model)[max(layer - 1, 0)]
        spec = self.adapter.block_spec(getattr(lm_layer, "base_layer", lm_layer), 0)
        return Candidates(self, "visual_tokens", h, rows, pos=pos, rope=rope, valid=mask.bool(), layer_spec=spec)

    def choose_image_tokens(self, feats: Tensor, c: Candidates | None = None) -> tuple[Tensor, Tensor | None]:
        """keep [n_images, N] bool (top ceil(c*N) per image) and the router scores (None for a scorer,
        which scores the candidates ``c``)."""
        n_img, N = feats.shape[:2]
        k = n_kept(self.visual_capacity, N)
        if k == N:
            return torch.ones(n_img, N, dtype=torch.bool, device=feats.device), None
        if self.visual_scorer is not None:
            return top_per_image(self.visual_scorer(c), k), None
        if self.visual_router is None:
            raise ValueError("this model has no visual_tokens router; elastify it with visual_tokens=...")
        scores = self.visual_router(self.router_input(feats))
        return top_per_image(scores, k), scores

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, pixel_values: Tensor | None = None, image_features: Tensor | None = None,
                attention_mask: Tensor | None = None, past_key_values=None, position_ids: Tensor | None = None,
                use_cache: bool = False, logits_at: Tensor | None = None, logits_to_keep: int = 0,
                **kwargs) -> VLMOutput:
        """input_ids [B, T] with N image tokens per image; pixel_values [n_images, 3, H, W] (or the
        projected ``image_features`` [n_images, N, d]). ``logits_at`` [B, T] bool: return logits only
        where True (original positions), flattened [n, V]; else logits of the tokens the LM saw."""
        past_key_values = kwargs.pop("cache", past_key_values)
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        slots = input_ids == self.model.config.image_token_id
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        emb = self.adapter.language_model(self.model).embed_tokens(input_ids.masked_fill(slots, 0))
        pos = position_ids if position_ids is not None else (attention_mask.cumsum(1) - 1).clamp(min=0)
        if pixel_values is None and image_features is None:
            if slots.any():
                raise ValueError(f"the prompt holds {int(slots.sum())} image tokens but no image was given; "
                                 "pass pixel_values (or image_features)")
            return self._run_lm(emb, attention_mask, pos, past_key_values, use_cache, None, logits_at,
                                logits_to_keep, None, None, None)
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass either pixel_values or image_features, not both")
        feats = image_features if image_features is not None else self.image_features(pixel_values)
        _check_image_tokens(slots, *feats.shape[:2])
        emb = emb.masked_scatter(slots[..., None], feats.to(emb.dtype))
        rows = slots.reshape(-1).nonzero()[:, 0].view(feats.shape[:2])  # image tokens in masked_scatter's order
        if self._image_layer() > 0:  # the scorer chooses inside the LM (FastV)
            if use_cache or past_key_values is not None:
                raise ValueError(f"scorer {self.visual_scorer.name!r} prunes inside the language model: it runs "
                                 "without a KV cache (use_cache=False)")
            return self._prune_inside(emb, attention_mask, pos, slots, rows, logits_at, logits_to_keep)
        keep_img, scores = self.choose_image_tokens(feats, self.image_candidates(emb, rows, attention_mask, pos))
        if scores is not None and self._estimating and torch.is_grad_enabled():
            return self._gated_images(emb, attention_mask, pos, slots, keep_img, scores, logits_at, logits_to_keep)
        keep = ~slots
        keep[slots] = keep_img.reshape(-1)
        idx = keep_to_index(keep)[0]
        take = lambda t: torch.gather(t, 1, idx)  # noqa: E731
        emb = torch.gather(emb, 1, idx[..., None].expand(-1, -1, emb.shape[-1]))
        return self._run_lm(emb, take(attention_mask), take(pos), past_key_values, use_cache, None,
                            logits_at, logits_to_keep, idx, keep_img, pos[:, -1] + 1)

    def _gated_images(self, emb, mask, pos, slots, keep_img, scores, logits_at, logits_to_keep):
        """Router training: every image token stays, its keys gated by its hard gate (``lm.gated_attention``)."""
        if self.blocks and any(b.enabled for b in self.blocks):
            raise ValueError("train the visual_tokens router and the LM components separately "
                             "(elastify with visual_tokens only to train it)")
        gate = torch.ones(slots.shape, dtype=scores.dtype, device=emb.device)
        gate = gate.masked_scatter(slots, hard_gates(keep_img, scores).reshape(-1))
        return self._run_lm(emb, mask, pos, None, False, gate, logits_at, logits_to_keep, None, keep_img, None)

    def _run_lm(self, emb, mask, pos, cache, use_cache, gate, logits_at, logits_to_keep, idx, keep_img, nxt):
        lm = self.adapter.language_model(self.model)
        if gate is None:
            out = lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=use_cache,
                     **{cache_kwarg(lm): cache})
        else:
            with gated_attention(lm, gate):
                out = lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=False)
        h = out.last_hidden_state
        logits = self._logits(h, idx, logits_at, logits_to_keep)
        cache = out.cache if hasattr(type(out), "cache") or "cache" in out else getattr(out, "past_key_values", None)
        return VLMOutput(logits, cache, idx, keep_img, nxt if nxt is not None else pos[:, -1] + 1)

    def _logits(self, h, idx, logits_at, logits_to_keep):
        if logits_at is not None:
            sel = logits_at if idx is None else torch.gather(logits_at, 1, idx)
            return self.model.lm_head(h[sel])
        return self.model.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)

    # -- a scorer that chooses inside the LM (FastV) ----------------------------------------------
    @torch.no_grad()
    def _prune_inside(self, emb, mask, pos, slots, rows, logits_at, logits_to_keep):
        """``lm.prune_after`` LM layer K-1 (the scorer's ``image_layer``): the scorer scores the image
        tokens from that layer's input, and the visual capacity's share of them is kept."""
        layers, K = self.adapter.layers(self.model), self._image_layer()
        if not 1 <= K < len(layers):
            raise ValueError(f"scorer {self.visual_scorer.name!r}: its layer (fastv_layer) must be in "
                             f"[1, {len(layers) - 1}], got {K}")

        def choose(x, rope):  # called once, at layer K's input
            keep_img = top_per_image(self.visual_scorer(self.image_candidates(x, rows, mask, pos, rope, K)),
                            n_kept(self.visual_capacity, rows.shape[1]))
            keep = ~slots
            keep[slots] = keep_img.reshape(-1)
            return keep_to_index(keep)[0], keep_img

        h, idx, keep_img = prune_after(self.adapter.language_model(self.model), layers, K, emb, mask, pos, choose)
        return VLMOutput(self._logits(h, idx, logits_at, logits_to_keep), None, idx, keep_img, pos[:, -1] + 1)

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: Tensor, pixel_values: Tensor | None = None, image_features: Tensor | None = None,
                 attention_mask: Tensor | None = None, max_new_tokens: int = 20, eos_token_id=None,
                 use_cache: bool = True, **kwargs) -> Tensor:
        """Greedy decoding; returns the new tokens [B, n]. With the KV cache (default) the prompt is
        prefilled once with its image tokens already dropped, and each new token gets the position
        after the *original* prompt. use_cache=False recomputes everything each step (as a scorer that
        prunes inside the LM, FastV, always does)."""
        kwargs.pop("answer_mask", None)
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        if eos_token_id is None:
            eos_token_id = self.model.generation_config.eos_token_id or self.model.config.text_config.eos_token_id
        eos = torch.tensor(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        B = input_ids.shape[0]
        new = input_ids.new_zeros(B, 0)
        done = torch.zeros(B, dtype=torch.bool)
        if use_cache and self._image_layer() > 0:
            use_cache = False
        out = self(input_ids, pixel_values, image_features, attention_mask, use_cache=use_cache, logits_to_keep=1)
        mask = attention_mask if out.kept_positions is None else torch.gather(attention_mask, 1, out.kept_positions)
        nxt_pos = out.next_position
        for step in range(max_new_tokens):
            tok = out.logits[:, -1].argmax(-1)
            tok = torch.where(done, torch.full_like(tok, int(eos[0])), tok)
            new = torch.cat([new, tok[:, None]], 1)
            done |= torch.isin(tok, eos)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            if use_cache:
                mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
                out = self(tok[:, None], attention_mask=mask, past_key_values=out.past_key_values,
                           position_ids=nxt_pos[:, None], use_cache=True, logits_to_keep=1)
                nxt_pos = nxt_pos + 1
            else:
                ids = torch.cat([input_ids, new], 1)
                am = torch.cat([attention_mask, attention_mask.new_ones(B, new.shape[1])], 1)
                out = self(ids, pixel_values, image_features, am, logits_to_keep=1)
        return new


def _check_image_tokens(slots: Tensor, n_img: int, N: int) -> None:
    """The prompts' image tokens ``slots`` [B, T] hold the n_img images of N tokens, the same count in every row."""
    if not slots.any():
        raise ValueError(f"{n_img} image(s) given but the prompt has no image tokens; put the <image> "
                         "placeholder where the image goes (tiny_llava.build_inputs expands it)")
    if int(slots.sum()) != n_img * N:
        raise ValueError(f"the prompts hold {int(slots.sum())} image tokens but {n_img} image(s) need "
                         f"{n_img} x {N} = {n_img * N}; give one image per <image> placeholder, each "
                         f"expanded to {N} tokens")
    per_row = slots.sum(1)
    if bool((per_row != per_row[0]).any()) or int(per_row[0]) % N:
        raise ValueError(f"every sequence in a batch must hold the same number of images "
                         f"(image tokens per row: {per_row.tolist()}, {N} per image)")


LlavaAdapter.elastic_class = ElasticLlava  # what elastify wraps a LLaVA in (see the module doc)
__all__ = ["ElasticLlava", "VLMOutput", "SELECTORS", "load_lm_routers"]
