"""The model side: configuration, the component table, block specs, routers, routed execution, the
elastic model, budgets, LoRA, measured compute and checkpoints. Nothing here knows about a modality."""
