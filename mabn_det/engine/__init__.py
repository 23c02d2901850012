from .hooks import MABNDiagnostics
from .optimizer import build_mabn_optimizer, mabn_aware_param_groups
from .sampler import ResumableTrainingSampler
from .trainer import GradientAccumulationTrainer, Trainer

__all__ = [
    "GradientAccumulationTrainer",
    "MABNDiagnostics",
    "ResumableTrainingSampler",
    "Trainer",
    "build_mabn_optimizer",
    "mabn_aware_param_groups",
]
