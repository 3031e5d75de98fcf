"""Rank-r LoRA trained with the routers (elastilab.core.lora): it acts in every routed path as the merged
weights would, the teacher stays the pretrained model bit for bit, it is saved, loaded and resumed
with the routers, and bad settings fail clearly."""
import copy
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernel test on CPU (read when the kernels are first imported)

import pytest
import torch
from model_cases import CASES
from safetensors.torch import load_file

import elastilab as el
from elastilab.core.compute import measure_flops


def lora_model(name="llama", rank=1, **caps):
    """(case, untouched copy of the pretrained model, elastic model whose LoRA B factors are non-zero)."""
    torch.manual_seed(0)
    case = CASES[name]()
    pretrained = copy.deepcopy(case.model)
    em = el.elastify(case.model, el.ElasticConfig(**(caps or {"attn_heads": 1.0}), n_experts=case.n_experts,
                                                  lora_rank=rank))
    with torch.no_grad():
        for p in em.lora_parameters():
            p.normal_(std=0.3)  # B too: as after training
    return case, pretrained, em


def merged_twin(em, **config):
    """The same routers on the pretrained weights with the LoRA merged in by peft (``merge()``)."""
    twin = copy.deepcopy(em)
    for b in twin.blocks:
        for m in b.lora.values():
            m.merge()  # W += ΔW, peft's own arithmetic
    ref = el.elastify(twin.unelastify(), el.ElasticConfig(**config))
    with torch.no_grad():
        for k, v in ref.router_state().items():
            v.copy_(em.router_state()[k])
    for b, rb in zip(em.blocks, ref.blocks):
        rb.unit_order = b.unit_order  # clustered experts: the same slices
    return ref


ROUTED = [  # (capacities, ElasticConfig extras): each routed path at 0.5, and everything at 1.0
    ({"attn_tokens": 0.5}, {}), ({"attn_tokens": 0.5}, {"attn_tokens_variant": "keep_kv"}),
    ({"mlp_tokens": 0.5}, {}), ({"attn_heads": 0.5}, {}), ({"mlp_experts": 0.5}, {}),
    ({"mlp_experts": 0.5}, {"expert_partition": "clustered"}), ({"mlp_units": 0.5}, {}),
    ({"attn_tokens": 0.5, "mlp_tokens": 0.5, "attn_heads": 0.5, "mlp_experts": 0.5}, {}),
    ({c: 1.0 for c in ("attn_tokens", "mlp_tokens", "attn_heads", "mlp_experts")}, {}),
]


@pytest.mark.parametrize("caps,extra", ROUTED)
@pytest.mark.parametrize("name", ["llama", "gpt2", "timm_vit", "phi3"])  # SwiGLU; Conv1D [in, out]; fused qkv (and up)
def test_lora_acts_in_every_routed_path_as_the_merged_weights(name, caps, extra):
    case, pretrained, em = lora_model(name, **caps, **extra)
    ref = merged_twin(em, **caps, **extra, n_experts=case.n_experts)
    with torch.no_grad():
        out, want = case.output(em(**case.inputs)), case.output(ref(**case.inputs))
        base = case.output(pretrained(**case.inputs))
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    assert (out - base).abs().max() > 1e-2  # the LoRA really changed the routed model


def test_lora_acts_in_the_triton_kernels():
    """The MLP kernels take the spec's weights: with the LoRA they run on W + ΔW (interpreter on CPU)."""
    from elastilab_kernels import mlp_triton, ops
    if not mlp_triton.INTERPRET:
        pytest.skip("the Triton interpreter was off when the kernels were first imported")
    case, _, em = lora_model(mlp_experts=0.5)
    ref = merged_twin(em, mlp_experts=0.5, n_experts=case.n_experts)
    em.set_backend("triton")
    ref.set_backend("torch")
    launches = ops.LAUNCHES
    with torch.no_grad():
        torch.testing.assert_close(em(**case.inputs).logits, ref(**case.inputs).logits, rtol=0, atol=1e-4)
    assert ops.LAUNCHES > launches  # the kernels ran, not a torch fallback


@pytest.mark.parametrize("name", ["llama", "gpt2", "timm_vit"])
def test_the_teacher_is_the_pretrained_model_exactly_and_only_routers_and_lora_train(name):
    torch.manual_seed(0)
    case = CASES[name]()
    pretrained = copy.deepcopy(case.model)
    em = el.elastify(case.model, el.ElasticConfig(attn_heads=0.5, mlp_experts=0.5, n_experts=case.n_experts,
                                                  lora_rank=2))
    base = {n: p.detach().clone() for n, p in case.model.named_parameters()
            if ".lora_" not in n and ".routers." not in n}
    before = {k: v.detach().clone() for k, v in em.trainable_state().items()}
    trainable = {n for n, p in case.model.named_parameters() if p.requires_grad}
    assert trainable and all(".routers." in n or ".lora_" in n for n in trainable)
    case.distill(em, steps=3)
    after = em.trainable_state()
    assert all(not torch.equal(after[k], v) for k, v in before.items() if ".lora." in k)  # gradients reached A and B
    for n, p in case.model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
    with torch.no_grad():
        with em.routers_disabled():
            teacher = case.output(em(**case.inputs))
        assert torch.equal(teacher, case.output(pretrained(**case.inputs)))
        em.set_capacity(attn_heads=1.0, mlp_experts=1.0)  # the student at 1.0 is the LoRA-tuned model
        assert not torch.equal(case.output(em(**case.inputs)), teacher)
    plain = em.unelastify()  # the plain projections come back: the pretrained model, as it was
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in pretrained.named_parameters()]
    assert el.fingerprint(plain) == el.fingerprint(pretrained)


def test_save_load_round_trip_counts_and_reconstructs_the_lora(tmp_path):
    case, pretrained, em = lora_model(attn_heads=0.5, mlp_experts=0.5)
    em.save_routers(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "routers.json").read_text())
    n_lora = sum(p.numel() for p in em.lora_parameters())
    # rank 1 on all 7 projections of 3 layers of d=64 (kv 32, MLP 96)
    assert n_lora == 3 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 96) * 3) == meta["lora_params"]
    assert meta["lora_fraction"] == pytest.approx(n_lora / meta["base_params"])
    assert meta["router_params"] == sum(p.numel() for p in em.router_parameters())
    assert meta["elastic_config"]["lora_rank"] == 1 and meta["elastic_config"]["lora_targets"] == []
    saved = load_file(tmp_path / "r" / "routers.safetensors")
    assert {k for k in saved if ".lora." in k} == {k for k in em.trainable_state() if ".lora." in k}
    assert "0.lora.self_attn.q_proj.A" in saved
    loaded = el.load_routers(pretrained, tmp_path / "r")  # the fingerprint ignores the LoRA factors
    assert loaded.elastic_config.lora_rank == 1
    for k, v in em.trainable_state().items():
        assert torch.equal(loaded.trainable_state()[k], v), k
    with torch.no_grad():
        assert torch.equal(loaded(**case.inputs).logits, em(**case.inputs).logits)


def test_targets_alpha_and_checkpoints_without_lora(tmp_path):
    torch.manual_seed(0)
    em = el.elastify(CASES["llama"]().model, el.ElasticConfig(mlp_experts=0.5, n_experts=4, lora_rank=2,
                                                              lora_alpha=4.0, lora_targets=("q_proj", "down_proj")))
    assert sorted({k.split(".")[3] for k in em.trainable_state() if ".lora." in k}) == ["down_proj", "q_proj"]
    assert all(m.scaling["default"] == 2.0 for b in em.blocks for m in b.lora.values())
    em.save_routers(tmp_path / "t")
    loaded = el.load_routers(em.unelastify(), tmp_path / "t")
    assert loaded.elastic_config.lora_targets == ("q_proj", "down_proj") and loaded.elastic_config.lora_alpha == 4.0
    # routers saved without a LoRA, and a routers.json written before the LoRA fields existed, load as before
    plain = el.elastify(loaded.unelastify(), el.ElasticConfig(mlp_experts=0.5, n_experts=4))
    assert "lora_params" not in plain.parameter_summary() and not plain.lora_parameters()
    plain.save_routers(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "routers.json").read_text())
    for k in ("lora_rank", "lora_alpha", "lora_targets"):
        del meta["elastic_config"][k]
    (tmp_path / "p" / "routers.json").write_text(json.dumps(meta))
    again = el.load_routers(plain.unelastify(), tmp_path / "p")
    assert again.elastic_config.lora_rank == 0 and not any(".lora." in k for k in again.trainable_state())


def test_measured_flops_are_those_of_the_model_without_lora():
    """Merged once at inference: the LoRA adds no FLOPs to the routed forward."""
    case, _, em = lora_model(attn_heads=0.5, mlp_experts=0.5)
    merged = merged_twin(em, attn_heads=0.5, mlp_experts=0.5, n_experts=case.n_experts)  # the same choices
    with_lora, without = measure_flops(em, **case.inputs), measure_flops(merged, **case.inputs)
    assert with_lora == without
    for part in ("attention", "mlp"):
        assert with_lora[part] == with_lora["analytic_" + part] > 0


def test_training_rebuilds_the_weights_and_inference_caches_them():
    case, _, em = lora_model(mlp_experts=0.5, expert_partition="clustered")
    block = em.blocks[0]
    with torch.no_grad():
        first = block._spec().mlp.w_in
        assert block._spec().mlp.w_in is first  # merged once, permuted once
        block.lora["mlp.up_proj"].lora_B["default"].weight.add_(1.0)  # a changed factor (an optimizer step)
        assert not torch.equal(block._spec().mlp.w_in, first)
    w = block._spec().mlp.w_in  # with a gradient: a graph back to the factors
    assert w.requires_grad and w.grad_fn is not None


def test_bad_lora_settings_fail_clearly():
    llama = lambda: CASES["llama"]().model
    for kwargs, message in [({"lora_rank": -1}, "lora_rank must be an integer >= 0"),
                            ({"lora_rank": 1.5}, "lora_rank must be an integer >= 0"),
                            ({"lora_rank": True}, "lora_rank must be an integer >= 0"),
                            ({"lora_rank": 1, "lora_alpha": 0}, "lora_alpha must be a finite number > 0"),
                            ({"lora_rank": 1, "lora_alpha": float("nan")}, "lora_alpha must be a finite number > 0"),
                            ({"lora_rank": 1, "lora_targets": "q_proj"}, "lora_targets must be a list"),
                            ({"lora_alpha": 2.0}, "give lora_rank >= 1")]:
        with pytest.raises(ValueError, match=message):
            el.ElasticConfig(attn_heads=0.5, **kwargs)
    model = llama()
    with pytest.raises(ValueError, match=r"lora_targets names \['qkv'\].*allowed: down_proj, gate_proj, k_proj"):
        el.elastify(model, el.ElasticConfig(attn_heads=0.5, lora_rank=1, lora_targets=("qkv",)))
    with pytest.raises(ValueError, match="lora_rank 40 exceeds the smallest dimension .* 1 <= lora_rank <= 32"):
        el.elastify(model, el.ElasticConfig(attn_heads=0.5, lora_rank=40))
    assert not any("lora" in n for n, _ in model.named_parameters())  # refused before the model changed
    em = el.elastify(model, el.ElasticConfig(attn_heads=0.5, lora_rank=1))
    with pytest.raises(ValueError, match="already has a LoRA"):
        em.add_lora(2)
    with pytest.raises(ValueError, match="holds LoRA adapters"):  # someone else's peft adapters
        el.elastify(_peft_llama(), el.ElasticConfig(attn_heads=0.5))
    with pytest.raises(ValueError, match="lora_lr must be a finite number > 0"):
        el.DistillConfig(lora_lr=0.0)


def _peft_llama():
    from peft import LoraConfig, inject_adapter_in_model
    return inject_adapter_in_model(LoraConfig(r=1, target_modules=["q_proj"]), CASES["llama"]().model)


# -- `elastilab train --lora-rank` on the tiny Llama ---------------------------------------------
@pytest.fixture
def tiny_cli(monkeypatch, tmp_path):
    import elastilab.cli.main as cli
    import elastilab.cli.train as train_cli

    def load_tiny(name):
        torch.manual_seed(0)
        return CASES["llama"]().model, lambda s: [ord(c) % 101 for c in s]

    monkeypatch.setattr(train_cli, "_load_lm", load_tiny)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 4)
    args = ["--text", str(text), "--attn-heads", "0.5", "--mlp-experts", "0.5", "--n-experts", "4",
            "--batch-size", "4", "--seq-len", "12", "--lr", "1e-2", "--lora-lr", "1e-2"]
    return lambda *extra: cli.main(["train", *args, *extra])


def test_cli_lora_rank_trains_saves_resumes_and_inits_from(tiny_cli, tmp_path, capsys):
    run = tiny_cli
    a, b, c, d = (tmp_path / n for n in "abcd")
    assert run("--steps", "4", "--lora-rank", "1", "--out", a) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["lora_params"] > 0
    meta = json.loads((a / "routers.json").read_text())
    assert meta["elastic_config"]["lora_rank"] == 1 and meta["lora_params"] == printed["lora_params"]
    first = load_file(a / "routers.safetensors")
    assert any(k.endswith(".B") and v.abs().max() > 0 for k, v in first.items())  # the LoRA trained
    # interrupted after step 2, resumed: the same routers and LoRA as the uninterrupted run
    assert run("--steps", "2", "--checkpoint-every", "1", "--lora-rank", "1", "--out", b) == 0
    assert run("--steps", "4", "--checkpoint-every", "1", "--lora-rank", "1", "--out", b, "--resume") == 0
    resumed = load_file(b / "routers.safetensors")
    assert resumed.keys() == first.keys() and all(torch.equal(resumed[k], first[k]) for k in first)
    capsys.readouterr()
    assert run("--steps", "4", "--checkpoint-every", "1", "--out", b, "--resume") == 2  # the LoRA left out
    assert "elastic_config.lora_rank: 1 then, 0 now" in capsys.readouterr().err
    # --init-from keeps the checkpoint's LoRA, refuses another rank, adds one to routers without
    assert run("--steps", "1", "--init-from", a, "--out", c) == 0
    assert json.loads((c / "routers.json").read_text())["elastic_config"]["lora_rank"] == 1
    assert run("--steps", "1", "--init-from", a, "--lora-rank", "2", "--out", d) == 2
    assert "holds a rank-1 LoRA, which --lora-rank 2 cannot change" in capsys.readouterr().err
    assert run("--steps", "1", "--out", d) == 0
    assert run("--steps", "1", "--init-from", d, "--lora-rank", "1", "--out", tmp_path / "e") == 0
    assert json.loads((tmp_path / "e" / "routers.json").read_text())["elastic_config"]["lora_rank"] == 1
    for bad in (["--lora-rank", "-1"], ["--lora-rank", "one"]):
        with pytest.raises(SystemExit) as exit_:
            run(*bad, "--out", tmp_path / "f")
        assert exit_.value.code == 2
        assert "must be an integer >= 0" in capsys.readouterr().err
    assert run("--lora-rank", "1", "--lora-lr", "nan", "--out", tmp_path / "f") == 2
    assert "lora_lr must be a finite number > 0, got nan" in capsys.readouterr().err
