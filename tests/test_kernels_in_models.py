"""The Triton kernels inside whole (tiny) elastic models, under the Triton interpreter on CPU: the routed paths
launch them and give the torch backend's logits. The kernels' own tests are in kernels/tests/."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the import of the @triton.jit module

import torch  # noqa: E402

from elastilab_kernels import ops  # noqa: E402


def test_whole_model_on_the_triton_backend_matches_torch():
    """A whole (tiny) elastic model with set_backend("triton") under the interpreter: token- and
    expert-routed MLPs run the kernels (launches counted) and give the torch backend's logits."""
    from model_cases import CASES

    import elastilab as el
    case = CASES["llama"]()
    ids = {"input_ids": case.inputs["input_ids"][:1, :8]}
    em = el.elastify(case.model, el.ElasticConfig(mlp_tokens=0.5, mlp_experts=0.5, n_experts=4))
    with torch.no_grad():
        em.set_backend("torch")
        ref = em(**ids).logits
        em.set_backend("triton")
        before = ops.LAUNCHES
        out = em(**ids).logits
    assert ops.LAUNCHES - before >= len(em.blocks), "the Triton kernels did not run"
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_a_decode_step_of_the_routed_model_runs_the_unit_kernels_in_every_layer():
    from model_cases import CASES

    import elastilab as el
    case = CASES["llama"]()
    em = el.elastify(case.model, el.ElasticConfig(mlp_units=0.5))
    ids = case.inputs["input_ids"][:1]
    with torch.no_grad():
        cache = em(input_ids=ids[:, :-1], use_cache=True).cache
        torch_step = em(input_ids=ids[:, -1:], cache=cache, use_cache=True).logits
        cache = em(input_ids=ids[:, :-1], use_cache=True).cache
        em.set_backend("triton")
        before = ops.LAUNCHES
        triton_step = em(input_ids=ids[:, -1:], cache=cache, use_cache=True).logits
    assert ops.LAUNCHES - before == 2 * len(em.blocks)
    torch.testing.assert_close(triton_step, torch_step, rtol=1e-4, atol=1e-5)
