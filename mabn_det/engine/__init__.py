from .hooks import MABNDiagnostics
from .sampler import ResumableTrainingSampler
from .trainer import GradientAccumulationTrainer, Trainer

__all__ = [
    "GradientAccumulationTrainer",
    "MABNDiagnostics",
    "ResumableTrainingSampler",
    "Trainer",
]
