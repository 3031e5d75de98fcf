import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import elastilab as el
from elastilab.distill import DistillConfig, kl_loss
from model_cases import CASES

HERE = Path(__file__).parent


def test_kl_is_zero_for_identical_and_positive_otherwise():
    a = torch.randn(2, 5, 11)
    assert kl_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_loss(a, torch.randn(2, 5, 11)).item() > 0.01


def test_distillation_lowers_kl_and_logs_a_dataframe(tmp_path):
    case = CASES["llama"]()
    em = el.elastify(case.model, el.ElasticConfig(mlp_tokens=0.5, attn_heads=0.5))
    data = torch.randint(0, 101, (32, 16))
    before = el.evaluate(em, data[:8])
    log = el.distill(em, data, steps=30, batch_size=8, lr=3e-2, progress=False,
                     checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=10)
    after = el.evaluate(em, data[:8])
    assert list(log.columns[:6]) == ["step", "loss", "kl", "bce", "balance", "agreement"]
    assert len(log) == 30 and log.step.iloc[-1] == 30
    assert after["kl"] < before["kl"]
    assert (tmp_path / "ck" / "routers.safetensors").exists()
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".")]  # no temp files left
    assert el.load_routers(case.model.__class__(case.model.config), tmp_path / "ck", strict_fingerprint=False)


def test_capacity_sampling_covers_the_range_and_restores_capacities():
    case = CASES["llama"]()
    em = el.elastify(case.model, el.ElasticConfig(mlp_tokens=0.5, attn_tokens=0.5))
    log = el.distill(em, torch.randint(0, 101, (16, 8)), steps=12, batch_size=4, capacity_range=(0.3, 0.9),
                     components_per_step=1, progress=False)
    caps = log[["cap_attn_tokens", "cap_mlp_tokens"]].to_numpy()
    assert ((caps == 1.0).sum(1) == 1).all()  # exactly one component routed per step
    routed = caps[caps < 1.0]
    assert routed.min() >= 0.3 and routed.max() <= 0.9 and routed.std() > 0.05
    assert em.capacities == {"attn_tokens": 0.5, "mlp_tokens": 0.5}


def test_bad_distill_settings_are_refused():
    with pytest.raises(ValueError, match="capacity_range"):
        DistillConfig(capacity_range=(0.8, 0.2))
    em = el.elastify(CASES["llama"]().model, el.ElasticConfig(mlp_tokens=0.5))
    with pytest.raises(ValueError, match="training blocks"):
        el.distill(em, torch.randint(0, 101, (2, 8)), batch_size=4, progress=False)
    with pytest.raises(TypeError, match="LongTensor"):
        el.distill(em, torch.randn(8, 8), progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        el.distill(em, "some text", progress=False)


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_two_cpu_processes_train_the_same_routers_as_one(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    subprocess.run([sys.executable, str(HERE / "ddp_train.py"), str(tmp_path / "one.st")], check=True, env=env,
                   capture_output=True, timeout=300)
    subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29531", str(HERE / "ddp_train.py"),
                    str(tmp_path / "two.st")], check=True, env=env, capture_output=True, timeout=300)
    one, two = load_file(tmp_path / "one.st"), load_file(tmp_path / "two.st")
    assert one.keys() == two.keys() and len(one) > 0
    for k in one:
        # stated tolerance: gradients are all-reduced in a different summation order
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5)
        if not k.startswith("init.") and k.endswith("weight"):
            assert (one[k] - one["init." + k]).abs().max() > 1e-3  # the routers really trained
