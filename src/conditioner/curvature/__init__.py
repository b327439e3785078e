"""Curvature of a model on a data set: K-FAC / EK-FAC factors, exact matrix-free products and spectra."""

from conditioner.curvature.kfac import EKFAC, KFAC, KroneckerOperator
from conditioner.curvature.losses import LossSpec
from conditioner.curvature.operator import CurvatureOperator

__all__ = ["EKFAC", "KFAC", "CurvatureOperator", "KroneckerOperator", "LossSpec"]
