"""AMED: the mean-value-direction solvers (`amed`, `amed_plugin`), their predictor network and its
data-free training. Imports nothing of this project outside `solvers`."""

from .predictor import (
    AMEDPredictor,
    Prediction,
    PredictorCard,
    PredictorConfig,
    PredictorKey,
    PredictorLoadError,
    PredictorStore,
    load_predictor,
    predictor_key,
    read_card,
    save_predictor,
    train_command,
)
from .solver import BASES, MULTISTEP, AMEDParams, AMEDPluginParams, History, IntervalUpdate, amed_interval
from .training import (
    TRAINING_SEED_BASE,
    TrainingSettings,
    TrainingSummary,
    new_predictor,
    teacher_states,
    train_predictor,
)

__all__ = [
    "BASES",
    "MULTISTEP",
    "TRAINING_SEED_BASE",
    "AMEDParams",
    "AMEDPluginParams",
    "AMEDPredictor",
    "History",
    "IntervalUpdate",
    "Prediction",
    "PredictorCard",
    "PredictorConfig",
    "PredictorKey",
    "PredictorLoadError",
    "PredictorStore",
    "TrainingSettings",
    "TrainingSummary",
    "amed_interval",
    "load_predictor",
    "new_predictor",
    "predictor_key",
    "read_card",
    "save_predictor",
    "teacher_states",
    "train_command",
    "train_predictor",
]
