"""Selection methods. A *scorer* gives, for one block and one component, the scores of its candidates
(tokens, heads, MLP slices or units); top-k (or a calibrated threshold) turns them into a selection, exactly
as for the learned routers. So every method runs the same routed execution and its compute is
measured the same way (the kvpress pattern: one small class per method, one registry, one test).

    with em.scoring("oracle"):          # or "random", "magnitude", ..., or a Scorer instance
        el.evaluate(em, blocks)

==================== ================================ ==================================================
name                 components                       score
==================== ================================ ==================================================
learned              all                              the routers (the default)
random               all, visual_tokens               seeded noise
oracle               all                              norm of the candidate's true contribution, computed
                                                      densely on the block's current input (not counted)
taylor               all                              |gradient of the loss x contribution|, first order,
                                                      from one dense forward + backward (not counted)
magnitude            attn_heads, mlp_experts,         norm of each head's query / slice's gate activations;
                     mlp_units                        a unit's gate activation (no extra work)
attention_received   attn_tokens, mlp_tokens          attention each token receives in the layer (H2O)
cls_attention        attn_tokens, mlp_tokens (ViTs)   attention the CLS token pays each token
fastv                visual_tokens (VLMs)             attention image tokens receive from the text (FastV)
tome                 attn_tokens, mlp_tokens (ViTs)   merges similar patches instead of dropping (ToMe)
lowrank_gate         mlp_units                        a rank-r predictor of the gate, before the gate runs
two_stage            mlp_units                        the predictor's candidates, then their exact
                                                      |hidden| x ||w_out|| (unit_choice.py)
==================== ================================ ==================================================

Counted scorers (``counted = True``) are real methods: their scoring work is part of the measured
compute (as router FLOPs). Oracles are ceilings for analysis: they look at what a candidate really
contributes, so their own work is left out of the measured compute (``compute.measure_flops``).
"""
from __future__ import annotations

# imported in this order, the registry lists: random, oracle, taylor, magnitude, attention_received,
# cls_attention, fastv, tome, lowrank_gate, two_stage
from elastilab.scorers.base import SCORERS, Candidates, Random, Scorer, Scoring, get_scorer, register, supports
from elastilab.scorers.merging import ToMe, merge_rows, nearest_kept, unmerge
from elastilab.scorers.oracles import Oracle, Taylor
from elastilab.scorers.training_free import AttentionReceived, ClsAttention, FastV, Magnitude
from elastilab.scorers.unit_choice import LowRankGate, TwoStage, fit_unit_predictors

__all__ = ["SCORERS", "Candidates", "Scorer", "Scoring", "get_scorer", "register", "supports", "Random",
           "Oracle", "Taylor", "AttentionReceived", "ClsAttention", "FastV", "Magnitude", "ToMe",
           "merge_rows", "nearest_kept", "unmerge", "LowRankGate", "TwoStage", "fit_unit_predictors"]
