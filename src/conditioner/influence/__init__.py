"""Training-data attribution: influence of training examples on queries, and its evaluation by the
linear datamodeling score (LDS)."""

from conditioner.influence.lds import LDSResult, draw_subsets, linear_datamodeling_score, retrain
from conditioner.influence.scores import METHODS, Influence, InfluenceContext, influence, self_influence
from conditioner.influence.task import Task

__all__ = [
    "METHODS",
    "InfluenceContext",
    "Influence",
    "LDSResult",
    "Task",
    "draw_subsets",
    "influence",
    "linear_datamodeling_score",
    "retrain",
    "self_influence",
]
