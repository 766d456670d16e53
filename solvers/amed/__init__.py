"""AMED: the mean-value-direction solvers (`amed`, `amed_plugin`), their predictor network and its
data-free training. Imports nothing of this project outside `solvers`."""

from .bases import BASES, MULTISTEP, PLUGIN_BASES, AMEDParams, AMEDPluginParams, PluginBase
from .predictor import (
    AMEDPredictor,
    Prediction,
    PredictorCard,
    PredictorConfig,
    PredictorKey,
    PredictorLoadError,
    PredictorStore,
    load_predictor,
    new_card,
    predictor_key,
    read_card,
    save_predictor,
    train_command,
)
from .solver import History, IntervalUpdate, amed_interval
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
    "PLUGIN_BASES",
    "TRAINING_SEED_BASE",
    "AMEDParams",
    "AMEDPluginParams",
    "AMEDPredictor",
    "History",
    "IntervalUpdate",
    "PluginBase",
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
    "new_card",
    "new_predictor",
    "predictor_key",
    "read_card",
    "save_predictor",
    "teacher_states",
    "train_command",
    "train_predictor",
]
