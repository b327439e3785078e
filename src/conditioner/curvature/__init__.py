"""Curvature of a model on a data set: K-FAC / EK-FAC factors, exact matrix-free products and spectra."""

from conditioner.curvature.exact import GGN, EmpiricalFisher, ExactCurvature, Hessian
from conditioner.curvature.kfac import EKFAC, KFAC, KroneckerOperator
from conditioner.curvature.losses import LossSpec
from conditioner.curvature.operator import CurvatureOperator
from conditioner.curvature.spectra import hutchinson_trace, hutchpp_trace, lanczos, slq, spectral_density

__all__ = [
    "EKFAC",
    "GGN",
    "KFAC",
    "CurvatureOperator",
    "EmpiricalFisher",
    "ExactCurvature",
    "Hessian",
    "KroneckerOperator",
    "LossSpec",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "slq",
    "spectral_density",
]
