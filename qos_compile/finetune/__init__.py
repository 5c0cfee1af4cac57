"""Per-OP fine-tuning (method step 7): BN-only (the paper) and full retraining (the baseline).

* :func:`expand_operating_points`: the final QoSNet (bank = chosen circuits, one OP per
  scale) from a tolerance-trained single-OP QoSNet;
* :func:`finetune_bn`: shared frozen weights; per-OP BatchNorm (γ, β, running stats) and
  per-OP biases trained, all OPs in every batch, gradients averaged, one step;
* :func:`finetune_full`: every OP its own full copy of the model, fine-tuned alone;
* :func:`evaluate_ops`, :func:`count_params`, :func:`overhead_report`.
"""
from .bn import (FinetuneConfig, FinetuneResult, bn_only_parameters, evaluate_ops, finetune_bn, finetune_full)
from .expand import clone_qnet, expand_operating_points
from .overhead import ParamCounts, count_params, overhead_report

__all__ = ["FinetuneConfig", "FinetuneResult", "ParamCounts", "bn_only_parameters", "clone_qnet", "count_params",
           "evaluate_ops", "expand_operating_points", "finetune_bn", "finetune_full", "overhead_report"]
