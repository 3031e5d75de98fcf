"""Bad input gets a clear, specific error: what was wrong and what is allowed."""
import pytest
import torch
from model_cases import CASES

import elastilab as el


@pytest.mark.parametrize("kwargs, match", [
    ({"mlp_tokens": 1.5}, r"capacity of mlp_tokens must be in \(0, 1\]"),
    ({"mlp_tokens": 0}, r"must be in \(0, 1\]"),
    ({"mlp_tokens": "half"}, "must be a number"),
    ({}, "enables no component"),
    ({"mlp_experts": 0.5, "n_experts": 0}, "n_experts must be a positive integer"),
    ({"mlp_experts": 0.5, "expert_partition": "random"}, "expert_partition must be one of"),
    ({"mlp_tokens": 0.5, "mode": "causal"}, "mode must be one of"),
])
def test_config_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        el.ElasticConfig(**kwargs)


def test_unknown_component_names_the_allowed_ones():
    with pytest.raises(TypeError):
        el.ElasticConfig(mlp_neurons=0.5)
    em = el.elastify(CASES["llama"]().model, mlp_tokens=0.5)
    with pytest.raises(ValueError, match="unknown component 'mlp_neurons'; allowed: attn_tokens"):
        em.set_capacity(mlp_neurons=0.5)
    with pytest.raises(ValueError, match="attn_heads is not elastic in this model"):
        em.set_capacity(attn_heads=0.5)


def test_expert_count_must_divide_the_mlp_width():
    with pytest.raises(ValueError, match="n_experts=5 does not divide the MLP width 96"):
        el.elastify(CASES["llama"]().model, el.ElasticConfig(mlp_experts=0.5, n_experts=5))


def test_unsupported_architecture_lists_the_supported_ones():
    from transformers import BertConfig, BertModel
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(TypeError, match="no adapter for BertModel. Supported: llama: LlamaForCausalLM"):
        el.elastify(bert, mlp_tokens=0.5)


def test_a_component_the_family_cannot_route_is_refused_with_the_reason():
    model = CASES["olmo2"]().model
    with pytest.raises(ValueError, match=r"olmo2 models do not support \['attn_heads'\].*query over every head"):
        el.elastify(model, attn_heads=0.5, mlp_tokens=0.5)
    assert not any(type(m).__name__ == "ElasticBlock" for m in model.modules())  # left as it was


def test_threshold_mode_needs_calibration():
    case = CASES["llama"]()
    em = el.elastify(case.model, el.ElasticConfig(mlp_tokens=0.5, mode="threshold"))
    with pytest.raises(RuntimeError, match="not calibrated for threshold mode; call ElasticModel.calibrate"):
        em(**case.inputs)


def test_double_elastify_and_missing_checkpoint(tmp_path):
    em = el.elastify(CASES["llama"]().model, mlp_tokens=0.5)
    with pytest.raises(TypeError, match="already elastic"):
        el.elastify(em, mlp_tokens=0.5)
    with pytest.raises(FileNotFoundError, match="holds no router checkpoint"):
        el.load_routers(CASES["llama"]().model, tmp_path)


def test_unelastify_restores_the_original_blocks():
    case = CASES["gpt2"]()
    with torch.no_grad():
        ref = case.output(case.model(**case.inputs))
    em = el.elastify(case.model, mlp_tokens=0.25)
    model = em.unelastify()
    with torch.no_grad():
        assert torch.equal(case.output(model(**case.inputs)), ref)


def test_clustered_experts_are_a_permutation_and_stay_exact():
    case = CASES["llama"]()
    with torch.no_grad():
        ref = case.output(case.model(**case.inputs))
    em = el.elastify(case.model, el.ElasticConfig(mlp_experts=1.0, n_experts=4, expert_partition="clustered"))
    for b in em.blocks:
        assert sorted(b.unit_order.tolist()) == list(range(96))
        assert b.unit_order.tolist() != list(range(96))
    with torch.no_grad():
        assert (case.output(em(**case.inputs)) - ref).abs().max() < 1e-4


def test_clustered_experts_route_their_clusters_and_permute_once():
    """Below capacity 1.0 the routed path runs the chosen *clusters*: its value equals the training
    estimator's, which masks the permuted hidden units of the unchosen clusters in the dense MLP; the
    permuted weights are built once, not on every forward."""
    case = CASES["llama"]()
    em = el.elastify(case.model, el.ElasticConfig(mlp_experts=0.5, n_experts=4, expert_partition="clustered"))
    with torch.no_grad():
        routed = case.output(em(**case.inputs))
        with em.capacity(mlp_experts=1.0):
            dense = case.output(em(**case.inputs))
    with em.training_estimator():
        estimated = case.output(em(**case.inputs, use_cache=False)).detach()
    torch.testing.assert_close(routed, estimated, atol=1e-5, rtol=1e-5)
    assert (routed - dense).abs().max() > 1e-3  # the expert path really ran
    block = em.blocks[0]
    first = block._spec().mlp.w_in
    assert block._spec().mlp.w_in is first  # cached
    with torch.no_grad():
        block.base_layer.mlp.up_proj.weight.mul_(2.0)  # base weights changed: permuted again
    assert block._spec().mlp.w_in is not first


# ------------------------------------------------------------------ issue 9: bad input on the command line
# Each row: (argv, expected message on stderr). All end with exit code 2 and no traceback. The text
# commands run on a tiny random Llama ("tiny-lm", 9 heads, 8 experts) with a character tokenizer.
import json  # noqa: E402
import math  # noqa: E402

from elastilab.cli import main as cli  # noqa: E402

LONG_TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(120))


class CharTokenizer:
    def encode(self, s, add_special_tokens=False, verbose=False):
        return [ord(c) % 128 for c in s]


def _tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)  # the same weights every time, so saved routers match the fingerprint
    cfg = LlamaConfig(vocab_size=128, hidden_size=72, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval(), CharTokenizer()


@pytest.fixture
def fake_zoo(monkeypatch, tmp_path):
    """zoo.load with a tiny LM and a tiny DINOv2; Hub ids fail as they do without a network."""
    import transformers
    real_load = el.zoo.load

    def load(name, **kwargs):
        if name == "tiny-lm":
            return _tiny_lm()
        if name == "dinov2-small":
            from elastilab.zoo.dinov2 import preprocess
            return CASES["hf_dinov2"]().model, preprocess
        return real_load(name, **kwargs)

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find "
                      "them in the cached files.")

    monkeypatch.setattr(el.zoo, "load", load)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    (tmp_path / "long.txt").write_text(LONG_TEXT)
    (tmp_path / "short.txt").write_text("too short\n" * 3)
    return tmp_path


def run_cli(argv, capsys):
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


EVAL = ["eval", "--model", "tiny-lm", "--seq-len", 16, "--blocks", 2]
CLI_ERRORS = [
    (EVAL + ["--mlp-tokens", 0.5, "--seq-len", 1], r"argument --seq-len: must be an integer >= 2, got 1"),
    (EVAL + ["--mlp-tokens", 0.5, "--blocks", 0], r"argument --blocks: must be an integer >= 1, got 0"),
    (EVAL + ["--mlp-tokens", 0.5, "--blocks", -1], r"argument --blocks: must be an integer >= 1, got -1"),
    (["train", "--model", "tiny-lm", "--mlp-tokens", 0.5, "--out", "OUT", "--calibration-blocks", 0],
     r"argument --calibration-blocks: must be an integer >= 1, got 0"),
    (["train", "--model", "tiny-lm", "--mlp-tokens", "1.0", "--out", "OUT"],
     r"every capacity is 1.0 \(--mlp-tokens 1\), so nothing is skipped.*give at least one component a "
     r"capacity below 1.0"),
    (EVAL + ["--mlp-tokens", 0.5, "--mode", "threshold"],
     r"--mode threshold needs token routers calibrated on sample text, and the mlp_tokens routers are not "
     r"\(fresh routers: no --routers given\); use --mode topk, or --routers DIR written by `elastilab train`"),
    (["eval", "--model", "dinov2-small", "--mlp-tokens", 0.5],
     r"this command takes causal language models \(e.g. smollm2-135m\), but 'dinov2-small' is a Dinov2Model; "
     r"image models "
     r"such as dinov2-small are trained and evaluated with `elastilab vit`, tiny-llava with `elastilab vlm`"),
    (EVAL + ["--mlp-tokens", 0.5, "--text", "TMP/short.txt"],
     r"asked for one block of 16 tokens but the eval split \(the last 10% of the text\) has \d+ tokens "
     r"\(0 blocks\); use a longer text, a smaller seq_len"),
    (["eval", "--model", "HuggingFaceTB/not-cached", "--mlp-tokens", 0.5],
     r"'HuggingFaceTB/not-cached' is not cached locally and the Hugging Face Hub cannot be reached .*"
     r"offline defaults that need no network: smollm2-135m, .*tiny-llava"),
]


@pytest.mark.parametrize("argv, match", CLI_ERRORS,
                         ids=lambda v: " ".join(map(str, v)) if isinstance(v, list) else None)
def test_cli_bad_input_catalogue(argv, match, fake_zoo, capsys):
    argv = [str(a).replace("TMP", str(fake_zoo)).replace("OUT", str(fake_zoo / "out")) for a in argv]
    rc, out, err = run_cli(argv, capsys)
    assert rc == 2 and "Traceback" not in err, err
    assert __import__("re").search(match, err), err
    assert not (fake_zoo / "out").exists()  # refused before anything was written


VISION_COMPONENT_ERRORS = [
    ("visual_tokens", r"unknown ViT component 'visual_tokens' \(visual_tokens belongs to visual-language models: "
                      r"elastilab vlm\); allowed: attn_tokens, mlp_tokens, attn_heads, mlp_experts"),
    ("foo", r"unknown ViT component 'foo'; allowed: attn_tokens, mlp_tokens, attn_heads, mlp_experts"),
    ("", r"no component to route; give one or more of: attn_tokens, mlp_tokens, attn_heads, mlp_experts"),
    (",mlp_tokens,bar", r"unknown ViT component 'bar'"),
]


@pytest.mark.parametrize("components, match", VISION_COMPONENT_ERRORS)
def test_vision_train_components(components, match, tmp_path, capsys):
    from elastilab.analysis import vision
    rc, out, err = run_cli(["vit", "train", "--domain", "digits04", "--out", tmp_path / "r", "--components",
                            components],
                           capsys)
    assert rc == 2 and __import__("re").search("argument --components: " + match, err), err
    assert not (tmp_path / "r").exists()
    assert vision.check_components(["mlp_tokens", "attn_heads", "mlp_tokens"]) == ("mlp_tokens", "attn_heads")
    with pytest.raises(ValueError, match=match):
        vision.train("digits04", str(tmp_path / "r"), components=[c for c in components.split(",") if c])


SUBCOMMAND_ERRORS = [  # (argv, message): refused by argparse, before any model is loaded
    (["vit", "train", "--domain", "mnist", "--out", "OUT"], r"argument --domain: invalid choice: 'mnist'"),
    (["vit", "bench", "--images", 0, "--out", "OUT/v.json"], r"argument --images: must be an integer >= 1, got 0"),
    (["vit", "crossdomain"], r"the following arguments are required: --out"),
    (["vlm", "train", "--capacity-range", 0.2, 1.5, "--out", "OUT"], r"argument --capacity-range: capacity must be in "
                                                                      r"\(0, 1\], got 1.5"),
    (["vlm", "bench", "--per-class", "ten", "--out", "OUT/b.json"], r"argument --per-class: must be an integer >= 1, "
                                                                     r"got 'ten'"),
    (["zoo", "dinov2-probe", "--out", "OUT/p.safetensors", "--size", 100],
     r"argument --size: must be a positive multiple of the patch size 14 \(e.g. 112, 224\), got 100"),
    (["zoo", "tiny-llava-train", "--steps", 10], r"the following arguments are required: --out"),
    (["bench", "profile", "--capacity", 0], r"argument --capacity: capacity must be in \(0, 1\], got 0.0"),
    (["bench", "speed", "--capacities", "1,x", "--out", "OUT"], r"argument --capacities: expected comma-separated "
                                                                 r"capacities like 0.75,0.5, got '1,x'"),
    (["vision", "train"], r"argument command: invalid choice: 'vision' \(choose from .*vit"),
]


@pytest.mark.parametrize("argv, match", SUBCOMMAND_ERRORS,
                         ids=lambda v: " ".join(map(str, v)) if isinstance(v, list) else None)
def test_subcommand_bad_arguments_exit_2_with_a_clear_message(argv, match, tmp_path, capsys):
    rc, out, err = run_cli([str(a).replace("OUT", str(tmp_path / "out")) for a in argv], capsys)
    assert rc == 2 and "Traceback" not in err, err
    assert __import__("re").search(match, err), err
    assert not (tmp_path / "out").exists()


def _gpt2_cross_attention():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=101, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                      add_cross_attention=True))


def _llama_without_layers():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=0,
                                        num_attention_heads=2, num_key_value_heads=1))


LIBRARY_ERRORS = [  # (what is called, expected message)
    (lambda: el.elastify(_llama_without_layers(), mlp_tokens=0.5), r"LlamaForCausalLM has no layers"),
    (lambda: el.elastify(_gpt2_cross_attention(), mlp_tokens=0.5),
     r"GPT-2 layer 0 has cross-attention \(add_cross_attention=True.*decoder-only GPT-2"),
    (lambda: el.data.token_blocks(CharTokenizer(), "abc", 8), r"asked for one block of 8 tokens but the text has 3 "
                                                              r"tokens \(0 blocks\)"),
    (lambda: el.data.token_blocks(CharTokenizer(), LONG_TEXT, 8, 10 ** 6, split="train"),
     r"asked for 1000000 blocks of 8 tokens but the train split \(the first 90% of the text\)"),
    (lambda: el.elastify(CASES["hf_dinov2"]().model, mlp_tokens=0.5)(
        pixel_values=torch.full((2, 3, 32, 32), float("nan")).index_fill_(0, torch.tensor([0]), 0.0)),
     r"Dinov2Model: the image tensor holds 3072 NaN or inf values \(in image 1\)"),
    (lambda: el.elastify(CASES["timm_vit"]().model, mlp_tokens=0.5)(torch.full((1, 3, 32, 32), float("inf"))),
     r"NaN or inf values \(in image 0\)"),
]


@pytest.mark.parametrize("call, match", LIBRARY_ERRORS)
def test_library_bad_input_catalogue(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_zoo_load_of_an_unreachable_hub_id_says_so(fake_zoo):
    with pytest.raises(OSError, match="not cached locally and the Hugging Face Hub cannot be reached"):
        el.zoo.load("HuggingFaceTB/not-cached")


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "hub unreachable"])
def test_a_hub_id_without_network_fails_fast_with_what_works(offline, monkeypatch):
    """No ~50 s of retries: with HF_HUB_OFFLINE nothing is looked up, with the Hub unreachable one probe."""
    import socket
    import time

    from huggingface_hub import constants
    lookups = []

    def no_network(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror("network cut by the test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as read at import
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1") if offline else monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    reason = r"HF_HUB_OFFLINE is set" if offline else r"no connection to huggingface.co:443: network cut by the test"
    t0 = time.perf_counter()
    with pytest.raises(OSError, match=rf"'elastilab-tests/no-such-model' is not cached locally and the Hugging Face "
                                      rf"Hub cannot be reached \({reason}\); offline defaults that need no network: "
                                      rf"{', '.join(el.zoo.OFFLINE)}; or pass a local model folder"):
        el.zoo.load("elastilab-tests/no-such-model")
    assert time.perf_counter() - t0 < 10
    assert lookups == ([] if offline else ["huggingface.co"])


def test_a_wrong_typed_field_in_a_model_folders_config_names_the_file_and_the_field(tmp_path, capsys):
    from transformers import LlamaConfig
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": "64"}))
    message = rf"{tmp_path / 'config.json'}: Field 'hidden_size' expected int, got str \(value: '64'\)"
    with pytest.raises(ValueError, match=message):
        el.zoo.load(str(tmp_path))
    rc, out, err = run_cli(["eval", "--model", tmp_path, "--mlp-tokens", 0.5], capsys)
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert __import__("re").search(message, err), err


# ------------------------------------------------------------------ issue 9: honest CLI output
def test_eval_prints_the_effective_selection_and_warns_when_nothing_is_skipped(fake_zoo, capsys):
    rc, out, err = run_cli(EVAL + ["--text", fake_zoo / "long.txt", "--attn-heads", 0.9, "--mlp-experts", 0.75,
                                   "--mlp-tokens", 0.5, "--json"], capsys)
    assert rc == 0, err
    assert "capacities mlp_tokens=0.5, attn_heads=0.9, mlp_experts=0.75, mode topk (from the command line; " \
           "fresh, untrained routers)" in err
    assert "mlp_tokens 0.5 -> 9/16 tokens per 16-token block (the first 1 always computed)" in err
    assert "mlp_experts 0.75 -> 6/8 experts per token" in err
    assert ("warning: attn_heads 0.9 -> 9/9 heads per token: nothing skipped (capacities round up to whole "
            "heads; 0.888 or less skips one)") in err
    res = json.loads(out)
    assert res["requested_capacities"] == {"mlp_tokens": 0.5, "attn_heads": 0.9, "mlp_experts": 0.75}
    assert res["measured_capacities"] == {"mlp_tokens": pytest.approx(9 / 16), "attn_heads": 1.0,
                                          "mlp_experts": 0.75}


def test_eval_says_when_it_evaluates_fewer_blocks_than_asked(fake_zoo, capsys):
    rc, out, err = run_cli(EVAL + ["--text", fake_zoo / "long.txt", "--mlp-tokens", 0.5, "--blocks", 100], capsys)
    assert rc == 0, err
    n = len(el.data.token_blocks(CharTokenizer(), LONG_TEXT, 16, split="eval"))
    assert f"note: --blocks 100, but the eval split has only {n} blocks of 16 tokens; evaluating {n}" in err
    assert f"tokens: {n * 15}" in out


def test_help_shows_defaults_split_meaning_and_rounding(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ["(default: 128)", "(default: 8)", "(default: eval)", "(default: smollm2-135m)",
                     "eval = the last 10% (cut at a line start)", "rounded up to whole heads",
                     "rounded up to whole experts"]:
        assert expected in text


def _saved_routers(path, calibrate=False, recommended=None):
    model, tok = _tiny_lm()
    em = el.elastify(model, el.ElasticConfig(mlp_tokens=0.5, attn_heads=0.75))
    if calibrate:
        em.calibrate(el.data.token_blocks(tok, LONG_TEXT, 16, split="train")[:4])
    em.save_routers(path)
    if recommended is not None:
        meta = json.loads((path / "routers.json").read_text())
        (path / "routers.json").write_text(json.dumps({**meta, "recommended_capacities": recommended}))
    return path


def test_eval_with_routers_and_no_capacities_uses_the_recommended_point(fake_zoo, capsys):
    args = EVAL + ["--text", fake_zoo / "long.txt", "--json", "--routers"]
    plain = _saved_routers(fake_zoo / "plain")
    rc, out, err = run_cli(args + [plain], capsys)
    assert rc == 0, err
    assert f"capacities mlp_tokens=0.5, attn_heads=0.75, mode topk (the capacities {plain} was trained at (it " \
           "stores no recommended_capacities)" in err
    rec = _saved_routers(fake_zoo / "rec", recommended={"mlp_tokens": 0.75})
    rc, out, err = run_cli(args + [rec], capsys)
    assert rc == 0, err
    assert (f"capacities mlp_tokens=0.75, attn_heads=1, mode topk (the recommended operating point stored in {rec})"
            in err)
    assert json.loads(out)["requested_capacities"] == {"mlp_tokens": 0.75, "attn_heads": 1.0}
    bad = _saved_routers(fake_zoo / "bad", recommended={"mlp_neurons": 0.5})
    rc, out, err = run_cli(args + [bad], capsys)
    assert rc == 2 and f"{bad}: recommended_capacities: unknown component 'mlp_neurons'" in err


def test_threshold_mode_reports_requested_and_measured(fake_zoo, capsys):
    args = EVAL + ["--text", fake_zoo / "long.txt", "--mode", "threshold", "--json", "--routers"]
    rc, out, err = run_cli(args + [_saved_routers(fake_zoo / "raw")], capsys)
    assert rc == 2 and "mlp_tokens routers are not (this checkpoint was saved uncalibrated)" in err
    rc, out, err = run_cli(args + [_saved_routers(fake_zoo / "cal", calibrate=True)], capsys)
    assert rc == 0, err
    assert "mlp_tokens 0.5 -> tokens whose score passes the threshold calibrated for 50%" in err
    res = json.loads(out)
    assert res["mode"] == "threshold" and res["requested_capacities"]["mlp_tokens"] == 0.5
    assert (0 < res["measured_capacities"]["mlp_tokens"] <= 1
            and res["measured_capacities"]["attn_heads"] == pytest.approx(7 / 9, abs=1e-4))


def test_eval_json_never_prints_nan(fake_zoo, capsys, monkeypatch):
    real = el.evaluate
    monkeypatch.setattr(el, "evaluate",
                        lambda em, blocks: {**real(em, blocks), "kl": math.nan, "student_ppl": math.inf})
    rc, out, err = run_cli(EVAL + ["--text", fake_zoo / "long.txt", "--mlp-tokens", 0.5, "--json"], capsys)
    assert rc == 0, err
    res = json.loads(out, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert res["kl"] is None and res["student_ppl"] is None


# ------------------------------------------------------- issue 9: 16-bit images (zoo.load's pair: test_dinov2.py)
def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    from elastilab.zoo.dinov2 import preprocess
    gray16 = (np.arange(28 * 28).reshape(28, 28) * 83).astype(np.uint16)  # 0 .. 65_000
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    png = Image.open(tmp_path / "g16.png")
    assert png.mode.startswith("I")
    gray8 = np.round(gray16 / 257).astype(np.uint8)
    assert torch.allclose(preprocess(png, 28), preprocess(gray8, 28), atol=1e-6)
    assert torch.allclose(preprocess(gray16, 28), preprocess(gray8, 28), atol=1e-6)
    with pytest.raises(TypeError, match="floating-point PIL image"):
        preprocess(Image.fromarray(gray16.astype(np.float32)), 28)


def test_no_elastic_layer_says_why():
    from transformers import LlamaConfig, LlamaForCausalLM
    one = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="attn_tokens is never routed in layer 0 of a causal model"):
        el.elastify(one, attn_tokens=0.5)
    with pytest.raises(ValueError, match="every layer is in dense_layers"):
        el.elastify(one, el.ElasticConfig(mlp_tokens=0.5, dense_layers=(0,)))


def test_a_broken_models_perplexity_is_inf_not_an_overflow():
    from elastilab.tasks.lm import safe_exp
    assert safe_exp(1e6) == float("inf") and safe_exp(0.0) == 1.0


def test_eval_takes_mlp_units_and_reports_what_they_select_and_measure(fake_zoo, capsys):
    rc, out, err = run_cli(EVAL + ["--text", fake_zoo / "long.txt", "--mlp-units", 0.5, "--json"], capsys)
    assert rc == 0, err
    assert "capacities mlp_units=0.5, mode topk" in err and "mlp_units 0.5 -> 48/96 units per token" in err
    res = json.loads(out)
    assert res["requested_capacities"] == {"mlp_units": 0.5} and res["measured_capacities"] == {"mlp_units": 0.5}
    assert res["compute_fraction"]["mlp"] < 0.9 and res["compute_fraction"]["attention"] == 1.0
