"""Training loops and the float/QAT stages."""
from .loops import EpochStats, History, evaluate, fit, make_loader, seed_everything, sgd
from .stages import TrainConfig, train_float, train_qat

__all__ = ["EpochStats", "History", "TrainConfig", "evaluate", "fit", "make_loader", "seed_everything", "sgd",
           "train_float", "train_qat"]
