"""Neural-network modules."""
from .nn_basic import (BatchNorm1d, Dropout, Flatten, Identity, LayerNorm1d, Linear, Module, Parameter, ReLU,
                       Residual, Sequential, Sigmoid, SoftmaxLoss, Tanh)
from .nn_sequence import GRU, LSTM, RNN, Embedding, GRUCell, LSTMCell, Recurrent, RNNCell

__all__ = ["BatchNorm1d", "Dropout", "Flatten", "Identity", "LayerNorm1d", "Linear", "Module", "Parameter",
           "ReLU", "Residual", "Sequential", "Sigmoid", "SoftmaxLoss", "Tanh",
           "RNNCell", "RNN", "LSTMCell", "LSTM", "GRUCell", "GRU", "Recurrent", "Embedding"]
