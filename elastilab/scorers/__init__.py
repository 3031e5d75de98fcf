"""Selection methods. A *scorer* gives, for one block and one component, the scores of its candidates
(tokens, heads, MLP slices or units, a VLM's image tokens); top-k (or a calibrated threshold) turns them
into a selection, exactly as for the learned routers. So every method runs the same routed execution and
its compute is measured the same way (the kvpress pattern: one small class per method, one registry, one
test: tests/test_scorers.py).

    with em.scoring("oracle"):          # or "random", "magnitude", ..., or a Scorer instance
        el.evaluate(em, blocks)

The contract is ``base.Scorer``: a scorer declares ``name``, ``components`` and the model ``kinds`` it
works on ("lm", "vit", "vlm"), implements ``__call__(candidates)``, and overrides only the hooks whose
default does not fit it (``check``, ``before_forward``, ``merged_into``, ``image_layer``); ``register``
checks the declarations.

==================== ================================ ============ ==========================================
name                 chooses (its ``components``)     kinds        score
==================== ================================ ============ ==========================================
learned              all with a router, image tokens  all          the routers (the default)
random               all, image tokens                all          seeded noise
oracle               all layer components             all          norm of the candidate's true contribution,
                                                                   computed densely on the block's current
                                                                   input (not counted)
taylor               all layer components             lm, vit      |gradient of the loss x contribution|,
                                                                   first order, from one dense forward +
                                                                   backward (not counted)
magnitude            heads, MLP slices, MLP units     all          norm of each head's query / slice's gate
                                                                   activations; a unit's gate activation
attention_received   tokens (attention's, the MLP's)  all          attention each token receives (H2O)
cls_attention        tokens (attention's, the MLP's)  vit          attention the CLS token pays each token
fastv                image tokens                     vlm          attention image tokens receive from the
                                                                   text in LM layer K-1; pruned from K (FastV)
tome                 tokens (attention's, the MLP's)  vit          merges similar patches instead of dropping
lowrank_gate         MLP units                        all          a rank-r predictor of the gate, before the
                                                                   gate runs
two_stage            MLP units                        all          the predictor's candidates, then their
                                                                   exact |hidden| x ||w_out|| (unit_choice.py)
==================== ================================ ============ ==========================================

Counted scorers (``counted = True``) are real methods: their scoring work is part of the measured
compute (as router FLOPs). Oracles are ceilings for analysis: they look at what a candidate really
contributes, so their own work is left out of the measured compute (``compute.measure_flops``).
"""
from __future__ import annotations

# imported in this order, the registry lists: random, tome, oracle, taylor, magnitude, attention_received,
# cls_attention, fastv, lowrank_gate, two_stage
from elastilab.scorers.base import (
    KINDS,
    SCORABLE,
    SCORERS,
    Candidates,
    Random,
    Scorer,
    Scoring,
    check_contract,
    get_scorer,
    register,
    supports,
)
from elastilab.scorers.merging import ToMe, merge_rows, nearest_kept, unmerge
from elastilab.scorers.oracles import Oracle, Taylor
from elastilab.scorers.training_free import AttentionReceived, ClsAttention, FastV, Magnitude
from elastilab.scorers.unit_choice import LowRankGate, TwoStage, fit_unit_predictors

__all__ = ["KINDS", "SCORABLE", "SCORERS", "check_contract", "Candidates", "Scorer", "Scoring", "get_scorer",
           "register", "supports", "Random",
           "Oracle", "Taylor", "AttentionReceived", "ClsAttention", "FastV", "Magnitude", "ToMe",
           "merge_rows", "nearest_kept", "unmerge", "LowRankGate", "TwoStage", "fit_unit_predictors"]
