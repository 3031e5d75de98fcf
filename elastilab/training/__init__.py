"""Self-distillation: the loop (``distill``), its resumable state, the losses and router warm starts."""
