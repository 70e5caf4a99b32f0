"""Baselines: zero-parameter scorers (popularity, mean pooling) and trained baseline models.

The trained baselines are configurations of :class:`redrec.model.redrec.RedRec`, trained and evaluated by the same
trainer (:func:`redrec.train.train`), data pipeline and protocols as RED-Rec: their user towers are alternative
backbones (:mod:`redrec.baselines.sasrec`, :mod:`redrec.baselines.hstu`, or the HF decoder), their item tower,
projection head and next-item sampled softmax (shared uniform + in-batch negatives) are RED-Rec's.
:data:`MODEL_PRESETS` maps a baseline's name to its dotted :class:`redrec.train.TrainConfig` overrides; apply them
before the caller's own overrides (e.g. the item tower kind, or sizes).
"""

from redrec.baselines.zero import MeanPoolScorer, PopularityScorer

# SASRec -- Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018.  A causal self-attention
# encoder over learned item-id embeddings plus learned absolute positions; the user vector is the state at the
# last event (no scenarios, actions, hours or time gaps; one chronological sequence of the last ``last_n`` events).
# Trained here with the next-item sampled softmax, as in the HSTU paper's "SASRec (sampled softmax)" rows.
SASREC: dict[str, object] = {
    "model.user_tower.backbone": "sasrec",
    "model.user_tower.readout": "last",
    "model.item_tower.kind": "id",
    "model.user_tower.use_actions": False,
    "model.user_tower.use_hour": False,
    "model.user_tower.use_scenario": False,
    "model.user_tower.use_time_gap": False,
    "model.user_tower.use_position": True,
    "mixing.policy": "timestamp",
    "loss.window_weight": 0.0,
}

# HSTU -- Zhai et al., "Actions Speak Louder than Words: Trillion-Parameter Sequential Transducers for Generative
# Recommendations", ICML 2024.  Pointwise aggregated (SiLU, not softmax) attention with a relative position and
# relative time bias (eq. 1-3), so no absolute position embedding; otherwise the same inputs and readout as SASRec.
HSTU: dict[str, object] = {
    **SASREC,
    "model.user_tower.backbone": "hstu",
    "model.user_tower.use_position": False,
}

# HLLM-style -- Chen et al., "HLLM: Enhancing Sequential Recommendations via Hierarchical Large Language Models
# for Item and User Modeling", 2024.  An LLM user model over item vectors producing a single user interest, trained
# with next-item prediction: the HF decoder backbone with one shared query (no scenario queries, no scenario
# embedding), on the chronological last-n sequence.  The item tower (text LLM in the paper) is the caller's choice.
HLLM: dict[str, object] = {
    "model.user_tower.backbone": "qwen2",
    "model.user_tower.query_scope": "shared",
    "model.user_tower.queries_per_scenario": 1,
    "model.user_tower.use_scenario": False,
    "mixing.policy": "timestamp",
}

# MoRec -- Yuan et al., "Where to Go Next for Recommender Systems? ID- vs. Modality-based Recommender Models
# Revisited", SIGIR 2023.  SASRec whose item embeddings come from item content (a modality encoder) instead of ids:
# the SASRec preset with the ``features`` item tower (precomputed item vectors); the caller may select ``text``.
MOREC: dict[str, object] = {**SASREC, "model.item_tower.kind": "features"}

# RED-Rec -- the paper's model: the defaults of TrainConfig (no overrides).
REDREC: dict[str, object] = {}

MODEL_PRESETS: dict[str, dict[str, object]] = {
    "sasrec": SASREC,
    "hstu": HSTU,
    "hllm": HLLM,
    "morec": MOREC,
    "redrec": REDREC,
}

__all__ = ["MODEL_PRESETS", "MeanPoolScorer", "PopularityScorer"]
