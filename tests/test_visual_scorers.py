"""Random and FastV choose a LLaVA's image tokens as registered visual_tokens scorers (elastilab.scorers), through
the same em.scoring() path as every other method, and choose exactly the tokens their former special-cased
implementation in ElasticLlava chose (kept below, verbatim in substance, as the reference)."""
import pytest
import torch
import torch.nn.functional as F
from test_vlm import N_IMG, inputs, make

from elastilab.core.routing import keep_to_index, n_kept
from elastilab.scorers import FastV, Scorer


def previous_fastv_keep(spec, state, mask, slots, n_img, N, k):
    """The former adapters/llava/lm.py `_fastv_keep`: indices [B, T'] kept after layer K."""
    a = spec.attn
    h = spec.attn_norm(state["x"])
    B, T, _ = h.shape
    q = F.linear(h, a.w_q, a.b_q).view(B, T, a.n_heads, a.head_dim).transpose(1, 2)
    kk = F.linear(h, a.w_k, a.b_k).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
    cos, sin = (t.expand(B, -1, -1) for t in state["rope"])
    q, kk = a.heads(q, "q", (cos, sin)), a.heads(kk, "k", (cos, sin))
    s = a.scores(q, kk.repeat_interleave(a.n_heads // a.n_kv_heads, 1))
    valid = mask.bool()
    allowed = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()[None] & valid[:, None, :]
    att = s.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).mean(1)
    last = T - 1 - torch.flip(slots, [1]).float().argmax(1)
    after = (torch.arange(T, device=h.device)[None] > last[:, None]) & valid
    received = (att * after[..., None]).sum(1) / after.sum(1, keepdim=True).clamp(min=1)
    img_scores = received[slots].view(n_img, N)
    keep_img = torch.zeros_like(img_scores, dtype=torch.bool).scatter_(1, img_scores.topk(k, 1).indices, True)
    keep = ~slots
    keep[slots] = keep_img.reshape(-1)
    return keep_to_index(keep)[0]


def previous_random_keep(n_img, N, k, seed=0):
    """The former ElasticLlava._scores for selector "random", then its top-k."""
    scores = torch.rand((n_img, N), generator=torch.Generator().manual_seed(seed))
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)


@pytest.mark.parametrize("images_per_row,left_pad", [(1, 0), (2, 3)])
@pytest.mark.parametrize("capacity", [0.6, 0.2])
def test_random_and_fastv_choose_the_tokens_their_previous_implementation_chose(images_per_row, left_pad, capacity):
    model, em = make(visual_tokens=1.0, mlp_experts=1.0)
    x = inputs(images_per_row=images_per_row, left_pad=left_pad)
    slots = x["input_ids"] == model.config.image_token_id
    n_img, k = len(x["pixel_values"]), n_kept(capacity, N_IMG)
    layers = em.adapter.layers(model)
    for K in (1, 2):
        em.fastv_layer = K
        state = {}

        def capture(module, args, kwargs, state=state):  # layer K-1's input in the dense model: what FastV reads
            state["x"], state["rope"] = args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"]

        hook = layers[K - 1].register_forward_pre_hook(capture, with_kwargs=True)
        with torch.no_grad():
            model(**x)
        hook.remove()
        spec = em.adapter.block_spec(getattr(layers[K - 1], "base_layer", layers[K - 1]), 0)
        expected = previous_fastv_keep(spec, state, x["attention_mask"], slots, n_img, N_IMG, k)
        with torch.no_grad(), em.capacity(visual_tokens=capacity), em.scoring("fastv") as s:
            assert em.selector == "fastv" and s.image_layer(em) == K and em.scorer is None  # LM: its routers
            out = em(**x)
        assert torch.equal(out.kept_positions, expected), K
        assert out.image_keep.sum(1).tolist() == [k] * n_img
        em.fastv_layer = 3 - K  # a layer given to the scorer itself wins over the model's default
        with torch.no_grad(), em.capacity(visual_tokens=capacity), em.scoring(FastV(layer=K)):
            assert torch.equal(em(**x).kept_positions, expected), K
    with torch.no_grad(), em.capacity(visual_tokens=capacity), em.scoring("random"):
        first, again = em(**x).image_keep, em(**x).image_keep
    assert torch.equal(first, previous_random_keep(n_img, N_IMG, k)) and torch.equal(first, again)


def test_a_custom_visual_scorer_goes_through_the_same_path_and_bad_layers_are_refused():
    """Any Scorer of visual_tokens is used as the registered ones are: at the LM's input (image_layer 0, with the
    KV cache) or inside the LM (image_layer K); an impossible layer is a clear error."""
    _, em = make(visual_tokens=0.4)
    x = inputs(left_pad=2)

    class Last(Scorer):  # keep each image's last tokens
        name, components, kinds = "last_patches", ("visual_tokens",), ("vlm",)

        def __init__(self, layer=0):
            self.layer, self.seen = layer, []

        def image_layer(self, em):
            return self.layer

        def __call__(self, c):
            self.seen.append((tuple(c.h.shape), c.spec is not None))
            return c.rows.float()

    for layer in (0, 1):
        with torch.no_grad(), em.scoring(Last(layer)) as s:
            out = em(**x, use_cache=layer == 0)
        assert out.image_keep.tolist() == [[False, False, False, True, True]] * 2
        assert s.seen == [((2, x["input_ids"].shape[1], 32), True)]  # the whole sequence, scored once
    with em.scoring(Last(3)), pytest.raises(ValueError, match=r"must be in \[1, 2\], got 3"):
        em(**x)
    with em.scoring("fastv"), pytest.raises(ValueError, match="without a KV cache"):
        em(**x, use_cache=True)
    with pytest.raises(ValueError, match="FastV's layer must be an integer >= 1"):
        FastV(layer=0)
