"""Self-distillation tasks beyond text (the LM loss is ``distill.lm_loss``): ``vit`` (images) and
``vlm`` (image questions for LLaVA): losses, datasets and evaluation."""
