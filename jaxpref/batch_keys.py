"""The batch contract: the key names of the micro-batches the pipelines build and the objectives read.

Every micro-batch is a dict of numpy arrays [B, T, ...] (per sequence) or [B] (per row). Written here
once; ``jaxpref.data`` builds batches with these keys and each objective lists the ones it reads
(``Objective.batch_keys``), which the trainer checks against the data.
"""

from __future__ import annotations

# One token sequence per row: SFT and KD batches as they are; preference batches per side.
SEQUENCE = ("input_ids", "labels", "loss_mask", "positions", "segment_ids")
# KD with stored teacher targets: [B, T, K] top-k ids, log-probs and which entries are valid.
KD_TARGETS = ("target_token_ids", "target_logprobs", "target_mask")

# Pairs (DPO, IPO, ORPO, SimPO, reward): a chosen and a rejected sequence per row, and which rows are real.
PAIR_SIDES = ("chosen_", "rejected_")
PAIR = tuple(side + k for side in PAIR_SIDES for k in SEQUENCE) + ("pair_mask",)
REF_PAIR = ("ref_chosen_logps", "ref_rejected_logps")  # precomputed reference log-probs [B]

# KTO: one sequence per row, its KL partner (the completion of another row) and the row's label.
KTO_KL_PREFIX = "kl_"
KTO = SEQUENCE + tuple(KTO_KL_PREFIX + k for k in SEQUENCE) + ("desirable", "example_mask")
REF_KTO = ("ref_logps", "ref_kl_logps")  # precomputed reference log-probs [B]

# GRPO: one prompt + sampled completion per row (SEQUENCE; ``loss_mask`` marks the positions predicting
# completion tokens, ``segment_ids`` 0 on padding rows), the row's advantage [B] float32 (0 on padding rows),
# and the sampling policy's log-prob of each label [B, T] float32 (prediction-aligned, at the sampling
# temperature; zeros, and not read, unless the step reuses completions: ``trl.num_iterations`` > 1).
GRPO = SEQUENCE + ("advantages", "old_logps")
