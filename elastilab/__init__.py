"""elastilab: elastic pretrained Transformers (ElastiFormer, arXiv 2411.15281).

    import elastilab as el
    model, tok = el.zoo.load("smollm2-135m")
    em = el.elastify(model, el.ElasticConfig(mlp_experts=0.5, attn_tokens=0.75))
    log = el.distill(em, el.data.text("licenses"), tokenizer=tok, steps=200)
"""
from . import data, zoo
from .budget import allocate
from .config import COMPONENTS, ElasticConfig
from .distill import DistillConfig, distill, evaluate
from .checkpoint import fingerprint
from .elastic import ElasticModel, elastify
from .loading import load_routers
from .elastic_llava import ElasticLlava  # importing it makes elastify wrap LLaVAs in it
from .elastic_smolvlm import ElasticSmolVLM  # and SmolVLM / Idefics3 in it
from .quality import LMTask, ViTTask, frontier, frontier_summary, plot_frontier
from . import scorers
from .warm_start import warm_start

__all__ = ["COMPONENTS", "ElasticConfig", "ElasticModel", "ElasticLlava", "ElasticSmolVLM", "elastify", "load_routers",
           "fingerprint",
           "DistillConfig", "distill", "evaluate", "data", "zoo", "scorers",
           "frontier", "frontier_summary", "plot_frontier", "LMTask", "ViTTask", "allocate", "warm_start"]
__version__ = "0.1.0"
