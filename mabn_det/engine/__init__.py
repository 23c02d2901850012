from .hooks import MABNDiagnostics, PreciseMABN, update_mabn_stats
from .lazy_trainer import LazyTrainer
from .sampler import ResumableTrainingSampler
from .trainer import GradientAccumulationTrainer, Trainer

__all__ = [
    "GradientAccumulationTrainer",
    "LazyTrainer",
    "MABNDiagnostics",
    "PreciseMABN",
    "ResumableTrainingSampler",
    "Trainer",
    "update_mabn_stats",
]
