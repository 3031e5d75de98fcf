"""Elastic LLaVA: one tiny router chooses which image tokens the language model sees.

``visual_tokens`` is a single ``Router(d_lm, 1)`` (Linear(d_lm, 1)) scoring the projected image tokens at
the language model's input (as its first layer sees them, after the input RMSNorm). The top ``ceil(c * N)`` tokens of each image are kept, in order; the others
are *removed from the sequence*, so every LM layer (and the KV cache) holds fewer tokens. Kept tokens
keep their original positions (RoPE sees the same relative distances as in the full model), the 2-D
attention mask is gathered the same way, and decoding continues from the original length.

The LM components (attn_tokens, mlp_tokens, attn_heads, mlp_experts) wrap the inner LlamaModel through
the llama adapter, exactly as for a text LM:

    model, tok = el.zoo.load("tiny-llava")
    em = el.elastify(model, el.ElasticConfig(visual_tokens=0.5))      # an ElasticLlava
    batch = build_inputs(tok, "What digit is this?", digit_image)
    em.generate(**batch, max_new_tokens=3)                               # KV cache, dropped tokens
    em.selector = "fastv"                                                # baselines: "random", "fastv"

Training (self-distillation, KL on the answer tokens): the forward value is the hard top-k selection,
but while ``training_estimator()`` is on, the sequence keeps every token and each image token's *key*
is gated inside softmax attention by g = keep + (p - p.detach()), p = sigmoid(score):
    attn_i = sum_j g_j exp(s_ij) v_j / sum_j g_j exp(s_ij).
In value g is 1/0, which is exactly removing the dropped tokens (same positions, same masks); its
gradient d attn / d g_j = exp(s_ij) (v_j - attn_i) / Z tells a dropped token's score what it *would*
have contributed. (Gradients on the kept tokens alone barely move a ranking from its random start.)
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .adapters.llava import LlavaAdapter  # noqa: F401  (re-exported)
from .elastic import ElasticModel
from .routers import Router
from .routing import hard_gates, keep_to_index, n_kept

SELECTORS = ("router", "random", "fastv")
_KEY_GATE: contextvars.ContextVar = contextvars.ContextVar("elastilab_key_gate", default=None)
GATED_ATTENTION = "elastilab_gated"


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
    routers it is the only thing that trains). ``selector`` picks the image tokens: "router" (learned),
    "random" (seeded, training-free) or "fastv" (training-free: after LM layer ``fastv_layer``, keep
    the image tokens that received the most attention from the text that follows the image)."""

    def __init__(self, model, config, adapter=None):
        super().__init__(model, config, adapter)
        self.visual_router = None
        if config.visual_tokens is not None:
            self.visual_router = Router(model.config.text_config.hidden_size, 1)
            self.visual_router.requires_grad_(True)
        self.selector = "router"
        self.fastv_layer = 2
        self.random_seed = 0
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
        """As ``ElasticModel.scoring``; image tokens are chosen by the router ("learned"), "random"
        or "fastv" (attention received from the text in an early LM layer, ``fastv_layer``)."""
        name = scorer if isinstance(scorer, str) else getattr(scorer, "name", "learned")
        selector = {"learned": "router", "random": "random", "fastv": "fastv"}.get(name)
        if selector is None and self.visual_capacity < 1.0:
            raise ValueError(f"scorer {name!r} does not support visual_tokens; it supports learned, random, fastv")
        old, self.selector = self.selector, selector or self.selector
        try:
            if name == "fastv":  # chooses image tokens only; the LM components keep their routers
                yield None
            else:
                with super().scoring(scorer) as s:
                    yield s
        finally:
            self.selector = old

    @property
    def visual_capacity(self) -> float:
        c = self.elastic_config.visual_tokens
        return 1.0 if (c is None or self._visual_off) else c

    # -- the image tokens ------------------------------------------------------------------------
    def image_features(self, pixel_values: Tensor) -> Tensor:
        """Vision tower + projector: [n_images, N, d_lm]."""
        from .adapters.vit import check_finite
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

    def _scores(self, feats: Tensor) -> Tensor:
        if self.selector == "router":
            if self.visual_router is None:
                raise ValueError("this model has no visual_tokens router; elastify it with visual_tokens=...")
            return self.visual_router(self.router_input(feats))
        g = torch.Generator().manual_seed(self.random_seed)  # the same choice on every call
        return torch.rand(feats.shape[:2], generator=g).to(feats.device)

    def choose_image_tokens(self, feats: Tensor) -> tuple[Tensor, Tensor | None]:
        """keep [n_images, N] bool (top ceil(c*N) per image) and the router scores (None otherwise)."""
        if self.selector not in SELECTORS:
            raise ValueError(f"selector must be one of {SELECTORS}, got {self.selector!r}")
        n_img, N = feats.shape[:2]
        k = n_kept(self.visual_capacity, N)
        if k == N or self.selector == "fastv":  # fastv chooses inside the LM
            return torch.ones(n_img, N, dtype=torch.bool, device=feats.device), None
        scores = self._scores(feats)
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)
        return keep, scores if self.selector == "router" else None

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
        lm = self.model.model.language_model
        image_id = self.model.config.image_token_id
        slots = input_ids == image_id
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        emb = lm.embed_tokens(input_ids.masked_fill(slots, 0))
        if pixel_values is None and image_features is None:
            if slots.any():
                raise ValueError(f"the prompt holds {int(slots.sum())} image tokens but no image was given; "
                                 "pass pixel_values (or image_features)")
            pos = position_ids if position_ids is not None else (attention_mask.cumsum(1) - 1).clamp(min=0)
            return self._run_lm(emb, attention_mask, pos, past_key_values, use_cache, None, logits_at,
                                logits_to_keep, None, None, None)
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass either pixel_values or image_features, not both")
        feats = image_features if image_features is not None else self.image_features(pixel_values)
        n_img, N = feats.shape[:2]
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
        emb = emb.masked_scatter(slots[..., None], feats.to(emb.dtype))
        pos = (attention_mask.cumsum(1) - 1).clamp(min=0) if position_ids is None else position_ids
        keep_img, scores = self.choose_image_tokens(feats)
        if self.selector == "fastv" and self.visual_capacity < 1.0:
            if use_cache or past_key_values is not None:
                raise ValueError("the FastV baseline runs without a KV cache (use_cache=False)")
            return self._fastv(emb, attention_mask, pos, slots, n_img, N, logits_at, logits_to_keep)
        keep = ~slots
        keep[slots] = keep_img.reshape(-1)
        if scores is not None and self._estimating and torch.is_grad_enabled():
            if self.blocks and any(b.enabled for b in self.blocks):
                raise ValueError("train the visual_tokens router and the LM components separately "
                                 "(elastify with visual_tokens only to train it)")
            gate = torch.ones(B, T, dtype=scores.dtype, device=emb.device)
            gate = gate.masked_scatter(slots, hard_gates(keep_img, scores).reshape(-1))
            return self._run_lm(emb, attention_mask, pos, None, False, gate, logits_at, logits_to_keep,
                                None, keep_img, None)
        idx = keep_to_index(keep)[0]
        take = lambda t: torch.gather(t, 1, idx)  # noqa: E731
        emb = torch.gather(emb, 1, idx[..., None].expand(-1, -1, emb.shape[-1]))
        return self._run_lm(emb, take(attention_mask), take(pos), past_key_values, use_cache, None,
                            logits_at, logits_to_keep, idx, keep_img, pos[:, -1] + 1)

    def _run_lm(self, emb, mask, pos, cache, use_cache, gate, logits_at, logits_to_keep, idx, keep_img, nxt):
        lm = self.model.model.language_model
        if gate is None:
            out = lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=use_cache,
                     **{_cache_kwarg(lm): cache})
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

    # -- FastV (training-free baseline) ----------------------------------------------------------
    @torch.no_grad()
    def _fastv(self, emb, mask, pos, slots, n_img, N, logits_at, logits_to_keep):
        """Layers < K see every token; at layer K the image tokens that received the least attention
        in layer K-1 (mean over heads and over the text tokens after the images) are dropped, and
        layers >= K run on the rest (the mask and rotary tables are sliced to match)."""
        lm = self.model.model.language_model
        K = self.fastv_layer
        layers = self.adapter.layers(self.model)
        if not 1 <= K < len(layers):
            raise ValueError(f"fastv_layer must be in [1, {len(layers) - 1}], got {K}")
        k = n_kept(self.visual_capacity, N)
        B, T = slots.shape
        state = {}

        def capture(module, args, kwargs):
            state["x"] = args[0] if args else kwargs["hidden_states"]
            state["rope"] = kwargs["position_embeddings"]

        def prune(module, args, kwargs):
            if "idx" not in state:
                state["idx"] = self._fastv_keep(layers[K - 1], state, mask, slots, n_img, N, k)
            idx = state["idx"]
            x = args[0] if args else kwargs.pop("hidden_states")
            if x.shape[1] == T:
                x = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))
            cos, sin = kwargs["position_embeddings"]
            g = lambda t: torch.gather(t.expand(B, -1, -1), 1, idx[..., None].expand(-1, -1, t.shape[-1]))  # noqa
            kwargs["position_embeddings"] = (g(cos), g(sin))
            m = kwargs.get("attention_mask")
            if torch.is_tensor(m) and m.dim() == 4:
                m = m.expand(B, -1, -1, -1)
                m = torch.gather(m, 2, idx[:, None, :, None].expand(-1, m.shape[1], -1, m.shape[3]))
                kwargs["attention_mask"] = torch.gather(m, 3, idx[:, None, None, :].expand(-1, m.shape[1], m.shape[2], -1))
            kwargs.pop("position_ids", None)
            return (x, *args[1:]), kwargs

        hooks = [layers[K - 1].register_forward_pre_hook(capture, with_kwargs=True)]
        hooks += [layers[i].register_forward_pre_hook(prune, with_kwargs=True) for i in range(K, len(layers))]
        try:
            out = lm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=False)
        finally:
            for hk in hooks:
                hk.remove()
        idx = state["idx"]
        keep = torch.zeros(B, T, dtype=torch.bool, device=emb.device).scatter_(1, idx, True)
        logits = self._logits(out.last_hidden_state, idx, logits_at, logits_to_keep)
        return VLMOutput(logits, None, idx, keep[slots].view(n_img, N), pos[:, -1] + 1)

    def _fastv_keep(self, layer, state, mask, slots, n_img, N, k):
        """Indices [B, T'] of the tokens kept after layer K: all text, top-k image tokens per image by
        the attention they received in ``layer`` (recomputed from its input)."""
        spec = self.adapter.block_spec(getattr(layer, "base_layer", layer), 0)
        a = spec.attn
        h = spec.attn_norm(state["x"])
        B, T, _ = h.shape
        q = F.linear(h, a.w_q, a.b_q).view(B, T, a.n_heads, a.head_dim).transpose(1, 2)
        kk = F.linear(h, a.w_k, a.b_k).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        cos, sin = (t.expand(B, -1, -1) for t in state["rope"])
        q, kk = a.rope(q, cos, sin), a.rope(kk, cos, sin)
        kk = kk.repeat_interleave(a.n_heads // a.n_kv_heads, 1)
        s = (q @ kk.transpose(-1, -2)) * a.scaling
        valid = mask.bool()
        allowed = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()[None] & valid[:, None, :]
        att = s.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).mean(1)  # [B, T(q), T(k)]
        last = T - 1 - torch.flip(slots, [1]).float().argmax(1)                  # last image slot per row
        after = (torch.arange(T, device=h.device)[None] > last[:, None]) & valid  # the text that follows
        received = (att * after[..., None]).sum(1) / after.sum(1, keepdim=True).clamp(min=1)
        img_scores = received[slots].view(n_img, N)
        keep_img = torch.zeros_like(img_scores, dtype=torch.bool).scatter_(1, img_scores.topk(k, 1).indices, True)
        keep = ~slots
        keep[slots] = keep_img.reshape(-1)
        return keep_to_index(keep)[0]

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: Tensor, pixel_values: Tensor | None = None, image_features: Tensor | None = None,
                 attention_mask: Tensor | None = None, max_new_tokens: int = 20, eos_token_id=None,
                 use_cache: bool = True, **kwargs) -> Tensor:
        """Greedy decoding; returns the new tokens [B, n]. With the KV cache (default) the prompt is
        prefilled once with its image tokens already dropped, and each new token gets the position
        after the *original* prompt. use_cache=False recomputes everything each step (FastV)."""
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
        if use_cache and self.selector == "fastv" and self.visual_capacity < 1.0:
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


def _cache_kwarg(lm) -> str:
    """transformers renamed past_key_values to cache (5.2x); use whichever this version takes."""
    return _cache_kwarg_of(type(lm))


@functools.cache
def _cache_kwarg_of(lm_class) -> str:  # once per class, not once per decoding step
    return "cache" if "cache" in inspect.signature(lm_class.forward).parameters else "past_key_values"


# -- gated attention (the training estimator) ------------------------------------------------------
def _gated_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """softmax attention whose key j is weighted by gate[b, j] inside the softmax (see module doc)."""
    gate = _KEY_GATE.get()
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    s = (query @ key.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    Tq, Tk = s.shape[-2:]
    if attention_mask is None:
        allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=s.device).tril(Tk - Tq)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        allowed = attention_mask == 0
    s = s.masked_fill(~allowed, float("-inf"))
    w = (s - s.amax(-1, keepdim=True).detach()).exp() * gate[:, None, None, :Tk].to(s.dtype)
    w = w / w.sum(-1, keepdim=True)
    return (w @ value).transpose(1, 2).contiguous(), None


def _register_gated():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(GATED_ATTENTION, _gated_attention)
    AttentionMaskInterface.register(GATED_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def gated_attention(lm, gate: Tensor):
    """Run ``lm`` (a LlamaModel) with every key gated by gate [B, T] inside its attention."""
    _register_gated()
    old = lm.config._attn_implementation
    token = _KEY_GATE.set(gate)
    lm.config._attn_implementation = GATED_ATTENTION
    try:
        yield
    finally:
        lm.config._attn_implementation = old
        _KEY_GATE.reset(token)


# -- distillation and evaluation -------------------------------------------------------------------
def predicting_positions(answer_mask: Tensor) -> Tensor:
    """Positions whose next-token prediction is an answer token (position t predicts token t+1)."""
    out = torch.zeros_like(answer_mask)
    out[:, :-1] = answer_mask[:, 1:]
    return out


def answer_loss(em, wrapped, batch: dict, cfg) -> tuple[Tensor, dict]:
    """``distill(loss_fn=answer_loss)``: KL(teacher || student) on the answer tokens of an image-text
    batch {input_ids, attention_mask, answer_mask, image_features} (see answer_dataset)."""
    from .distill import kl_loss
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              image_features=batch["image_features"], logits_at=predicting_positions(batch["answer_mask"]))
    with torch.no_grad(), em.routers_disabled():
        teacher = em(**kw).logits
    student = wrapped(**kw).logits
    kl = kl_loss(student, teacher, cfg.temperature)
    agree = (student.argmax(-1) == teacher.argmax(-1)).float().mean()
    return kl, {"kl": kl.detach().item(), "agreement": agree.item()}


def answer_dataset(tokenizer, items, image_features: Tensor) -> list[dict]:
    """Items (tiny_llava.examples) and their projected features -> equal-length dicts for distill()."""
    from .zoo.tiny_llava import text_batch
    b = text_batch(tokenizer, [it["question"] for it in items], [it["answer"] for it in items])
    return [{"input_ids": b["input_ids"][i], "attention_mask": b["attention_mask"][i],
             "answer_mask": b["answer_mask"][i], "image_features": image_features[i]} for i in range(len(items))]


@torch.no_grad()
def evaluate(em, tokenizer, items, image_features: Tensor, batch_size: int = 16, measure: bool = True) -> dict:
    """Accuracy of the greedy answer's first token (per task) for teacher and student, student-teacher
    agreement on it, KL on it, image tokens kept, and the measured FLOPs of the LM + head relative to
    the teacher (first batch; features are precomputed so the tower does not count)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .distill import kl_loss
    from .zoo.tiny_llava import first_token_ids, text_batch
    res: dict = {"n": len(items)}
    acc_t: dict = {}
    acc_s: dict = {}
    agree = kl = 0.0
    flops = {}
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        b = text_batch(tokenizer, [it["question"] for it in chunk], [it["answer"] for it in chunk])
        first = b["answer_mask"] & ~torch.roll(b["answer_mask"], 1, 1)
        kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                  image_features=image_features[s:s + batch_size], logits_at=predicting_positions(first))
        for who in ("teacher", "student"):
            ctx = em.routers_disabled() if who == "teacher" else contextlib.nullcontext()
            with ctx:
                if measure and s == 0:
                    with FlopCounterMode(display=False) as fc:
                        out = em(**kw)
                    flops[who] = fc.get_total_flops()
                else:
                    out = em(**kw)
            if who == "teacher":
                t_logits = out.logits
            else:
                s_logits, kept = out.logits, out.image_keep
        gold = first_token_ids(tokenizer, [it["answer"] for it in chunk])
        for it, ot, os_ in zip(chunk, (t_logits.argmax(-1) == gold).tolist(), (s_logits.argmax(-1) == gold).tolist()):
            acc_t.setdefault(it["task"], []).append(ot)
            acc_s.setdefault(it["task"], []).append(os_)
        agree += (t_logits.argmax(-1) == s_logits.argmax(-1)).sum().item()
        kl += kl_loss(s_logits, t_logits).item() * len(chunk)
    for t in acc_t:
        res[f"teacher_acc_{t}"] = sum(acc_t[t]) / len(acc_t[t])
        res[f"acc_{t}"] = sum(acc_s[t]) / len(acc_s[t])
    res["teacher_acc"] = sum(sum(v) for v in acc_t.values()) / len(items)
    res["acc"] = sum(sum(v) for v in acc_s.values()) / len(items)
    res["agreement"] = agree / len(items)
    res["kl"] = kl / len(items)
    res["image_tokens_kept"] = int(kept[0].sum()) if kept is not None else image_features.shape[1]
    if flops:
        res["flops_fraction"] = flops["student"] / flops["teacher"]
    return res


def llava_parameter_count(config) -> dict:
    """Parameters of a LlavaForConditionalGeneration built from ``config`` on the meta device (no
    weights, no memory), and the fraction one visual-token router Linear(d_lm, 1) adds."""
    from transformers import LlavaForConditionalGeneration
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    d = config.text_config.hidden_size
    return {"params": total, "d_lm": d, "visual_router_params": d + 1, "fraction": (d + 1) / total}


def llava_15_7b_config():
    """LLaVA-1.5-7B's configuration from its published numbers: CLIP ViT-L/14 at 336 px (24 layers,
    d=1024, penultimate layer, 576 patch tokens), a 2-layer GELU MLP projector, Vicuna-7B (Llama:
    32 layers, d=4096, 32 heads, FFN 11008) with vocab 32064 (the llava-hf release, <image> added)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       tie_word_embeddings=False)


def load_lm_routers(model, path, visual_tokens: float | None = None, visual_from=None) -> ElasticLlava:
    """A LLaVA with the LM-component routers trained for its language model *as a text LM* (e.g.
    data/routers/smollm2-135m for tiny-llava, whose LM is the same SmolLM2 plus one <image> row),
    optionally with a fresh visual_tokens router. The check is the router layout (layers, components,
    shapes), since the LLaVA's fingerprint differs from the text LM's by construction.
    ``visual_from``: a visual-router checkpoint of this very LLaVA (fingerprint checked) to load too."""
    from .elastic import config_of, elastify_with, fingerprint, read_checkpoint
    meta, state = read_checkpoint(path)  # everything is checked before the model is changed
    state = {k: v for k, v in state.items() if not k.startswith("visual.")}
    if visual_from is not None:
        vmeta, vstate = read_checkpoint(visual_from)
        if vmeta["fingerprint"] != fingerprint(model):
            raise ValueError(f"the visual router in {visual_from} was trained for a different model")
        state.update({k: v for k, v in vstate.items() if k.startswith("visual.")})
        if visual_tokens is None:
            visual_tokens = vmeta["elastic_config"].get("visual_tokens")
    config = config_of(meta, path, visual_tokens=visual_tokens)
    keep_fresh_visual = visual_from is None  # a new visual router (if any) keeps its initial weights
    return elastify_with(model, config, state, path,
                         select=lambda k: not (keep_fresh_visual and k.startswith("visual.")))


__all__ = ["load_lm_routers", "ElasticLlava", "LlavaAdapter", "VLMOutput", "SELECTORS", "answer_loss", "answer_dataset",
           "evaluate", "gated_attention", "llava_parameter_count", "llava_15_7b_config", "predicting_positions"]


# -- commands: train the visual router on tiny-llava, benchmark it against the baselines --------------
SHIPPED_ROUTERS = "data/routers/tiny-llava-visual"  # read by default; written only where --out says


def tiny_llava_data(model, tokenizer, split: str, per_class: int | None = None, faces: int | None = None):
    """(items, projected image features) of tiny-llava's digit and face questions (captions are left
    out: one answer length keeps batches unpadded). ``per_class``/``faces`` take the first few."""
    from .zoo import tiny_llava as tl
    items, tower = tl.cached_features(model, split)
    pick = [i for i, it in enumerate(items) if it["task"] in ("digit", "face")]
    if per_class or faces:
        seen: dict = {}
        keep = []
        for i in pick:
            key = items[i]["answer"]
            limit = per_class if items[i]["task"] == "digit" else faces
            if limit is None or seen.get(key, 0) < limit:
                seen[key] = seen.get(key, 0) + 1
                keep.append(i)
        pick = keep
    with torch.no_grad():
        feats = model.model.multi_modal_projector(tower[pick])
    return [items[i] for i in pick], feats


def train_visual_router(steps: int = 150, batch_size: int = 8, lr: float = 1e-2, capacity_range=(0.15, 0.85),
                        out: str | None = None, seed: int = 0):
    """Self-distil the visual_tokens router of tiny-llava (KL on the answer tokens) and save it in
    the folder ``out`` (required: the shipped routers are never a default destination)."""
    if out is None:
        raise ValueError(f"out is required: the folder to save the routers in (the shipped ones are {SHIPPED_ROUTERS})")
    from .distill import distill
    from .elastic import elastify
    from .zoo import tiny_llava as tl
    model, tok = tl.load()
    em = elastify(model, visual_tokens=0.5)
    items, feats = tiny_llava_data(model, tok, "train")
    log = distill(em, answer_dataset(tok, items, feats), loss_fn=answer_loss, steps=steps, batch_size=batch_size,
                  lr=lr, capacity_range=capacity_range, seed=seed, progress=False)
    command = (f"python -m elastilab.vlm train --steps {steps} --batch-size {batch_size} --lr {lr} "
               f"--capacity-range {capacity_range[0]} {capacity_range[1]} --seed {seed}")
    em.save_routers(out, command=command, train_examples=len(items), log=log.round(4).to_dict("records"),
                    visual_parameter_fraction=em.visual_parameter_fraction())
    print(log[["step", "kl", "agreement", "cap_visual_tokens", "seconds"]].to_string(index=False), flush=True)
    return em, log


def bench(routers: str = SHIPPED_ROUTERS, out: str | None = None, per_class: int = 10, faces: int = 30,
          capacities=(0.75, 0.5, 0.25), fastv_layer: int = 2) -> dict:
    """Teacher accuracy; accuracy and agreement at each image-token budget for the learned router,
    random keep and FastV (same numbers of image tokens); parameter fractions. Written to the JSON file
    ``out`` if given (never by default)."""
    import json
    from pathlib import Path

    from .elastic import load_routers
    from .zoo import tiny_llava as tl
    model, tok = tl.load()
    em = load_routers(model, routers)
    items, feats = tiny_llava_data(model, tok, "test", per_class, faces)
    rows = []
    with em.capacity(visual_tokens=1.0):
        full = evaluate(em, tok, items, feats)
    rows.append({"method": "teacher", "capacity": 1.0, **full})
    for c in capacities:
        for sel in ("router", "fastv", "random"):
            em.selector, em.fastv_layer = sel, fastv_layer
            with em.capacity(visual_tokens=c):
                r = evaluate(em, tok, items, feats)
            rows.append({"method": {"router": "learned"}.get(sel, sel), "capacity": c, **r})
            print(json.dumps(rows[-1]), flush=True)
    em.selector = "router"
    result = {
        "model": "tiny-llava", "command": f"python -m elastilab.vlm bench --per-class {per_class} --faces {faces}",
        "routers": routers, "router_training": json.loads((Path(routers) / "routers.json").read_text())["metadata"]["command"],
        "eval_examples": {"digit": sum(it["task"] == "digit" for it in items), "face": sum(it["task"] == "face" for it in items)},
        "metric": "accuracy of the greedy answer's first token (digit names, yes/no are single tokens); "
                  "agreement: same greedy first token as the teacher; flops_fraction: LM + head FLOPs vs the "
                  "teacher on the first batch (image features precomputed)",
        "fastv_layer": fastv_layer, "image_tokens": feats.shape[1],
        "parameter_fraction": {"tiny-llava": em.visual_parameter_fraction(),
                               "llava-1.5-7b": llava_parameter_count(llava_15_7b_config())},
        "rows": rows,
    }
    if out is not None:
        from .files import atomic_write
        atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    return result


def _defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()}


def main(argv=None) -> None:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m elastilab.vlm", description="tiny-llava's visual-token router")
    sub = ap.add_subparsers(dest="cmd", required=True)
    tdef, bdef = _defaults(train_visual_router), _defaults(bench)  # one source of defaults: the functions
    t = sub.add_parser("train", help="self-distil the visual router (into --out)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--steps", type=int, default=tdef["steps"], help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=tdef["batch_size"], help="examples per step")
    t.add_argument("--lr", type=float, default=tdef["lr"], help="AdamW learning rate")
    t.add_argument("--capacity-range", type=float, nargs=2, default=tdef["capacity_range"],
                   help="each step keeps a fraction of image tokens drawn from this range")
    t.add_argument("--seed", type=int, default=tdef["seed"], help="data order and capacity draws")
    t.add_argument("--out", required=True, help=f"checkpoint folder (the shipped one is {SHIPPED_ROUTERS})")
    b = sub.add_parser("bench", help="learned vs FastV vs random at 75/50/25%% image tokens (into --out)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--routers", default=bdef["routers"], help="visual router checkpoint")
    b.add_argument("--per-class", type=int, default=bdef["per_class"], help="held-out digits per class")
    b.add_argument("--faces", type=int, default=bdef["faces"], help="held-out faces and non-faces each")
    b.add_argument("--out", required=True,
                   help="results JSON (the shipped one is benchmarks/results/tiny-llava-visual-tokens.json)")
    a = ap.parse_args(argv)
    if a.cmd == "train":
        train_visual_router(a.steps, a.batch_size, a.lr, tuple(a.capacity_range), a.out, a.seed)
    else:
        bench(a.routers, a.out, a.per_class, a.faces)


if __name__ == "__main__":
    main()
