"""The fast torch paths in kernels/ against the library's plain definitions: head-grouped attention
(kernels/head_attention.py, the library's path) vs the plain loop over rows x heads, the sorted expert MLP vs
spec.mlp_experts_forward, the index_copy residual vs the textbook formula. Values and gradients."""
import pytest
import torch

from elastilab.adapters.llama import rope as llama_rope
from elastilab.core import spec
from elastilab.core.routing import choose_slots
from elastilab.core.spec import AttnWeights, MLPWeights
from elastilab_kernels import ops
from elastilab_kernels.head_attention import head_routed_attention
from elastilab_kernels.reference import expert_mlp_sorted, head_attention_reference, routed_mlp_residual_reference


def make_case(B=3, K=11, S=11, H=4, Hkv=2, hd=8, kh=2, biases=True, with_rope=True, pad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3
    d = 24
    w = AttnWeights(r(H * hd, d), r(Hkv * hd, d), r(Hkv * hd, d), r(d, H * hd), H, Hkv, hd,
                    b_q=r(H * hd) if biases else None, b_o=r(d) if biases else None, rope=llama_rope)
    h = r(B, K, d)
    k, v = r(B, Hkv, S, hd), r(B, Hkv, S, hd)
    pos = torch.arange(S - K, S).expand(B, K)
    allowed = torch.arange(S)[None, None, :] <= pos[:, :, None]        # causal
    if pad:
        allowed = allowed & (torch.rand(B, 1, S, generator=g) > 0.2)
        allowed[..., 0] = True
    rope = (r(B, K, hd), r(B, K, hd)) if with_rope else None
    scores = r(B, K, H).requires_grad_(True)
    ids, gates = choose_slots(scores, kh / H)
    return w, h, k, v, allowed, rope, (ids, gates), scores


@pytest.mark.parametrize("kh", [1, 2, 4])
@pytest.mark.parametrize("biases,with_rope,pad", [(True, True, True), (False, False, False)])
def test_matches_per_head_loop_values_and_router_gradients(kh, biases, with_rope, pad):
    w, h, k, v, allowed, rope, heads, scores = make_case(kh=kh, biases=biases, with_rope=with_rope, pad=pad)
    ref = head_attention_reference(w, h, k, v, allowed, rope, heads)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), scores, retain_graph=True)
    out = head_routed_attention(w, h, k, v, allowed, rope, heads)
    (g_out,) = torch.autograd.grad(out.square().sum(), scores)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_out, g_ref, atol=1e-5, rtol=1e-5)


def test_unbalanced_heads_and_no_mask():
    w, h, k, v, _, rope, _, _ = make_case(K=9, S=9)
    ids = torch.zeros(3, 9, 1, dtype=torch.int64)
    ids[0, :2] = 3  # row 0: two tokens on head 3, the rest on head 0; other heads unused
    gates = torch.ones(3, 9, 1)
    ref = head_attention_reference(w, h, k, v, None, rope, (ids, gates))
    torch.testing.assert_close(head_routed_attention(w, h, k, v, None, rope, (ids, gates)), ref, atol=1e-5, rtol=1e-5)


def make_mlp(kind, seed=0, d=20, F=48, biases=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3
    return MLPWeights(kind, "silu" if kind == "swiglu" else "gelu", r(F, d), r(d, F),
                      r(F, d) if kind == "swiglu" else None,
                      r(F) if biases else None, r(d) if biases else None)


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
@pytest.mark.parametrize("n,k,E", [(13, 1, 4), (13, 3, 4), (13, 4, 4), (0, 2, 4), (31, 2, 8)])
def test_sorted_experts_match_the_definition(kind, n, k, E):
    w = make_mlp(kind, biases=kind == "gelu")
    h = torch.randn(n, 20, requires_grad=True)
    experts = torch.stack([torch.randperm(E)[:k] for _ in range(n)]) if n else torch.empty(0, k, dtype=torch.int64)
    gates = torch.rand(n, k, requires_grad=True)
    ref = spec.mlp_experts_forward(w, h, experts, gates, E)
    out = expert_mlp_sorted(w, h, experts, gates, E)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if n:
        g_ref = torch.autograd.grad(ref.square().sum(), (h, gates))
        g_out = torch.autograd.grad(out.square().sum(), (h, gates))
        for a, b in zip(g_out, g_ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.expert_mlp(h, experts, gates, w, E, backend="torch"), ref, atol=1e-5, rtol=1e-5)


def test_routed_residual_reference_is_the_formula_with_gradients():
    w = make_mlp("swiglu")
    x, h = torch.randn(17, 20, requires_grad=True), torch.randn(17, 20, requires_grad=True)
    idx = torch.tensor([3, 0, 16, 9])
    gate = torch.rand(4, requires_grad=True)
    out = routed_mlp_residual_reference(x, h, idx, w, gate)
    want = x.clone()
    want = want.index_put((idx,), x[idx] + gate[:, None] * spec.mlp_forward(w, h[idx]))
    torch.testing.assert_close(out, want)
    grads = torch.autograd.grad(out.square().sum(), (x, h, gate))
    wants = torch.autograd.grad(want.square().sum(), (x, h, gate))
    for a, b in zip(grads, wants):
        torch.testing.assert_close(a, b)
