"""Initialisers: each returns a Tensor and takes device=None, dtype="float32", requires_grad=False."""
from .init_basic import constant, one_hot, ones, ones_like, rand, randb, randn, zeros, zeros_like
from .init_initializers import kaiming_normal, kaiming_uniform, xavier_normal, xavier_uniform

__all__ = ["constant", "one_hot", "ones", "ones_like", "rand", "randb", "randn", "zeros", "zeros_like",
           "kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform"]
