from .checkpointing import (PREEMPTED_EXIT_STATUS, PreemptionCheckpointer, RotatingCheckpointer,
                            TrainingPreempted)
from .evaluation import MissingDatasetError, build_dataset_evaluator, check_datasets_on_disk
from .hooks import MABNDiagnostics, precise_mabn_statistics, update_mabn_stats
from .sampler import ResumableBatches, build_resumable_train_loader
from .state import ProcessStates, average_mabn_statistics, preserved_rng
from .trainer import GradientAccumulationTrainer, Trainer

__all__ = [
    "PREEMPTED_EXIT_STATUS",
    "GradientAccumulationTrainer",
    "MABNDiagnostics",
    "MissingDatasetError",
    "PreemptionCheckpointer",
    "ProcessStates",
    "ResumableBatches",
    "RotatingCheckpointer",
    "Trainer",
    "TrainingPreempted",
    "average_mabn_statistics",
    "build_dataset_evaluator",
    "build_resumable_train_loader",
    "check_datasets_on_disk",
    "precise_mabn_statistics",
    "preserved_rng",
    "update_mabn_stats",
]
