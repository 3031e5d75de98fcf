"""Self-distillation tasks, one module per modality: ``lm`` (text), ``vit`` (images) and ``vlm`` (image
questions for LLaVA): losses, datasets and evaluation."""
