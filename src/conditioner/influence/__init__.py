"""Training-data attribution: influence of training examples on queries, and its evaluation by the
linear datamodeling score (LDS)."""

from conditioner.influence.lds import LDSResult, draw_subsets, linear_datamodeling_score, retrain
from conditioner.influence.scores import METHODS, Curvature, Influence, influence, self_influence
from conditioner.influence.task import Task
from conditioner.influence.training import fit, mlp

__all__ = [
    "METHODS",
    "Curvature",
    "Influence",
    "LDSResult",
    "Task",
    "draw_subsets",
    "fit",
    "influence",
    "linear_datamodeling_score",
    "mlp",
    "retrain",
    "self_influence",
]
