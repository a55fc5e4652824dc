"""Neural-network modules."""
from .nn_basic import (BatchNorm1d, Dropout, Flatten, Identity, LayerNorm1d, Linear, Module, Parameter, ReLU,
                       Residual, Sequential, Sigmoid, SoftmaxLoss, Tanh)

__all__ = ["BatchNorm1d", "Dropout", "Flatten", "Identity", "LayerNorm1d", "Linear", "Module", "Parameter",
           "ReLU", "Residual", "Sequential", "Sigmoid", "SoftmaxLoss", "Tanh"]
