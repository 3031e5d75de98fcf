"""Train routers of a tiny Llama with elastilab.training.distill; run alone or under torchrun.

    python tests/ddp_train.py OUT.safetensors
    torchrun --nproc_per_node 2 tests/ddp_train.py OUT.safetensors
The global batch is the same either way (Accelerate splits each batch across processes).
"""
import sys

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import elastilab as el

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
em = el.elastify(model, el.ElasticConfig(mlp_tokens=0.5, mlp_experts=0.5, n_experts=4))
init = {f"init.{k}": v.detach().clone() for k, v in em.router_state().items() if "quantiles" not in k}
data = torch.randint(0, 101, (16, 12), generator=torch.Generator().manual_seed(1))
# balance_weight=0: the load-balance loss depends on batch statistics, so it is not additive over shards
log = el.distill(em, data, steps=4, batch_size=8, lr=1e-2, balance_weight=0.0, progress=False)
if int(__import__("os").environ.get("RANK", "0")) == 0:
    trained = {k: v.contiguous() for k, v in em.router_state().items() if "quantiles" not in k}
    save_file({**trained, **init}, sys.argv[1])
    print("final kl", log.kl.iloc[-1])
