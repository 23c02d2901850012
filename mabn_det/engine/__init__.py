from .evaluation import MissingDatasetError, build_dataset_evaluator, check_datasets_on_disk
from .hooks import MABNDiagnostics, precise_mabn_statistics, update_mabn_stats
from .sampler import ResumableBatches, build_resumable_train_loader
from .state import ProcessStates, average_mabn_statistics, preserved_rng
from .trainer import GradientAccumulationTrainer, Trainer

__all__ = [
    "GradientAccumulationTrainer",
    "MABNDiagnostics",
    "MissingDatasetError",
    "ProcessStates",
    "ResumableBatches",
    "Trainer",
    "average_mabn_statistics",
    "build_dataset_evaluator",
    "build_resumable_train_loader",
    "check_datasets_on_disk",
    "precise_mabn_statistics",
    "preserved_rng",
    "update_mabn_stats",
]
