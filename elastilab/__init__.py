"""elastilab: elastic pretrained Transformers (ElastiFormer, arXiv 2411.15281).

    import elastilab as el
    model, tok = el.zoo.load("smollm2-135m")
    em = el.elastify(model, el.ElasticConfig(mlp_experts=0.5, attn_tokens=0.75))
    log = el.distill(em, el.data.text("licenses"), tokenizer=tok, steps=200)
"""
from elastilab import data, scorers, zoo
from elastilab.adapters.llava.model import ElasticLlava  # importing it makes elastify wrap LLaVAs in it
from elastilab.adapters.smolvlm.model import ElasticSmolVLM  # and SmolVLM / Idefics3 in it
from elastilab.analysis.frontier import frontier, frontier_summary, plot_frontier
from elastilab.core.budget import allocate
from elastilab.core.checkpoint import fingerprint
from elastilab.core.config import COMPONENTS, ElasticConfig
from elastilab.core.loading import load_routers
from elastilab.core.model import ElasticModel, elastify
from elastilab.tasks.lm import LMTask, evaluate
from elastilab.tasks.vit import ViTTask
from elastilab.tasks.vlm import VLMTask
from elastilab.training.distill import DistillConfig, distill
from elastilab.training.warm_start import warm_start

__all__ = ["COMPONENTS", "ElasticConfig", "ElasticModel", "ElasticLlava", "ElasticSmolVLM", "elastify", "load_routers",
           "fingerprint",
           "DistillConfig", "distill", "evaluate", "data", "zoo", "scorers",
           "frontier", "frontier_summary", "plot_frontier", "LMTask", "ViTTask", "VLMTask", "allocate", "warm_start"]
__version__ = "0.1.0"
