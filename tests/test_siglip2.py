"""SigLIP 2 (adapters/siglip2.py): patchified NaFlex inputs, padded patches, the classification model, clear errors.
The invariant suite runs its unpadded case (model_cases_vlm.py)."""
import pytest
import torch

import elastilab as el
from elastilab.adapters.siglip2 import patchify
from elastilab.tasks.vit import vit_outputs

ALL = dict(attn_tokens=1.0, mlp_tokens=1.0, attn_heads=1.0, mlp_experts=1.0)


def config(**kw):
    from transformers import Siglip2VisionConfig
    return Siglip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               patch_size=8, num_patches=16, **kw)


def padded_inputs():
    """Three images: 4x4 patches, 2x6 and 3x3 padded to 16 (padding patches are zeros, as the processor's)."""
    x = patchify(torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)), 8)
    for i, (h, w) in ((1, (2, 6)), (2, (3, 3))):
        x["spatial_shapes"][i] = torch.tensor([h, w])
        x["pixel_attention_mask"][i, h * w:] = 0
        x["pixel_values"][i, h * w:] = 0
    return x


def test_padded_batch_at_capacity_one_is_the_pretrained_model_and_routes_below():
    from transformers import Siglip2VisionModel
    torch.manual_seed(0)
    model = Siglip2VisionModel(config()).eval()
    x = padded_inputs()
    with torch.no_grad():
        ref = model(**x)
        em = el.elastify(model, el.ElasticConfig(**ALL))
        out = em(**x)
        em.set_capacity(**{c: 0.5 for c in ALL})
        low = em(**x)
    real = x["pixel_attention_mask"].bool()
    assert (out.last_hidden_state - ref.last_hidden_state)[real].abs().max() <= 1e-4
    assert (out.pooler_output - ref.pooler_output).abs().max() <= 1e-4  # the pooling head reads the same mask
    assert torch.isfinite(low.pooler_output).all() and (low.pooler_output - ref.pooler_output).abs().max() > 1e-3


def test_the_classification_model_routes_its_tower():
    from transformers import Siglip2Config, Siglip2ForImageClassification
    torch.manual_seed(0)
    model = Siglip2ForImageClassification(Siglip2Config(vision_config=config().to_dict(), num_labels=3)).eval()
    x = padded_inputs()
    with torch.no_grad():
        ref = model(**x).logits
        em = el.elastify(model, el.ElasticConfig(**ALL))
        out = em(**x).logits
        em.set_capacity(mlp_tokens=0.25)
        low = em(**x).logits
    assert len(em.blocks) == 2 and (out - ref).abs().max() <= 1e-4 and (low - ref).abs().max() > 1e-4


def test_patchify_is_the_processors_patch_order_and_the_vit_task_uses_it():
    from transformers import Siglip2VisionModel
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches
    images = torch.randn(2, 3, 16, 24)
    x = patchify(images, 8)
    for i in range(2):
        assert torch.equal(x["pixel_values"][i], convert_image_to_patches(images[i], 8))
    assert x["spatial_shapes"].tolist() == [[2, 3]] * 2 and x["pixel_attention_mask"].sum().item() == 12
    with pytest.raises(ValueError, match="not a multiple of SigLIP 2's patch size 8"):
        patchify(torch.randn(1, 3, 20, 24), 8)
    # the ViT task (distillation, frontier --images) feeds [B, C, H, W] images through patchify
    model = Siglip2VisionModel(config()).eval()
    em = el.elastify(model, el.ElasticConfig(mlp_tokens=1.0))
    with torch.no_grad():
        hidden, logits = vit_outputs(em, images)
        ref = model(**x).last_hidden_state
    assert logits is None and (hidden - ref).abs().max() <= 1e-4


def test_bad_inputs_are_refused_clearly():
    from transformers import Siglip2VisionModel
    em = el.elastify(Siglip2VisionModel(config()).eval(), el.ElasticConfig(mlp_tokens=0.5))
    x = patchify(torch.randn(2, 3, 32, 32), 8)
    with pytest.raises(ValueError, match=r"takes patchified images, pixel_values \[B, n_patches, 192\].*patchify"):
        em(pixel_values=torch.randn(2, 3, 32, 32), pixel_attention_mask=x["pixel_attention_mask"],
           spatial_shapes=x["spatial_shapes"])
    with pytest.raises(ValueError, match=r"needs spatial_shapes \[B, 2\]"):
        em(pixel_values=x["pixel_values"], pixel_attention_mask=x["pixel_attention_mask"], spatial_shapes=None)
    with pytest.raises(ValueError, match=r"spatial_shapes \[\[4, 4\], \[3, 3\]\] do not match the real patches"):
        em(**{**x, "spatial_shapes": torch.tensor([[4, 4], [3, 3]])})
    with pytest.raises(ValueError, match="NaN or inf"):
        em(**{**x, "pixel_values": x["pixel_values"].clone().index_fill_(1, torch.tensor([3]), float("nan"))})


def test_router_training_refuses_padded_patches():
    """The training estimator runs attention without a mask: a padded batch is refused, not trained on wrongly."""
    from transformers import Siglip2VisionModel
    em = el.elastify(Siglip2VisionModel(config()).eval(), el.ElasticConfig(mlp_tokens=0.5))
    with em.training_estimator(), pytest.raises(ValueError, match="router training takes unpadded batches"):
        em(**padded_inputs()).last_hidden_state.sum().backward()


def test_cli_frontier_on_a_siglip2_folder(tmp_path, capsys):
    """`elastilab frontier --model DIR --images DIR` on a saved SigLIP 2 tower (images patchified on the way in)."""
    import json

    import numpy as np
    import pandas as pd
    from PIL import Image
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    from elastilab.cli.main import main
    from elastilab.core.config import LAYER_COMPONENTS
    torch.manual_seed(0)
    cfg = Siglip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              patch_size=32, num_patches=64)
    Siglip2VisionModel(cfg).save_pretrained(tmp_path / "siglip2")
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        pixels = (np.random.default_rng(i).random((40, 50, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / "imgs" / f"{i}.png")
    assert main(["frontier", "--model", str(tmp_path / "siglip2"), "--images", str(tmp_path / "imgs"),
                 "--size", "224", "--capacities", "0.5", "--scorers", "random,oracle", "--json"]) == 0
    rows = pd.DataFrame(json.loads(capsys.readouterr().out)["rows"])
    assert set(rows.component) == set(LAYER_COMPONENTS)
    assert (rows[rows.capacity == 1.0].cosine > 0.9999).all() and (rows[rows.capacity == 0.5].compute < 1).all()
    assert (rows[rows.capacity == 0.5].cosine < 0.9999).any()
