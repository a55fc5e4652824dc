"""Tests for needle.nn basics against PyTorch: weights copied into torch (needle's Linear weight is
(in, out), torch's (out, in)), non-zero biases, random upstream gradients; plus Module bookkeeping."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import needle as ndl
from needle import nn

ATOL, RTOL = 1e-5, 1e-4


def tensors(array, device=None):
    """The same float32 values as a needle and a torch leaf, both requiring gradients."""
    array = np.asarray(array, dtype=np.float32)
    return ndl.Tensor(array, device=device), torch.tensor(array, requires_grad=True)


def close(needle_value, torch_value, atol=ATOL, rtol=RTOL):
    expected = torch_value.detach().numpy()
    actual = needle_value.numpy()
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


def backward_both(y, y_torch, seed=0):
    """Backpropagate one random upstream gradient through both outputs."""
    upstream = np.random.default_rng(seed).standard_normal(y_torch.shape).astype(np.float32)
    y.backward(ndl.Tensor(upstream, device=y.device, requires_grad=False))
    y_torch.backward(torch.tensor(upstream))


def torch_linear(linear):
    """A torch.nn.Linear holding a copy of a needle Linear's weights."""
    out = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        out.weight.copy_(torch.tensor(linear.weight.numpy().T))
        if linear.bias is not None:
            out.bias.copy_(torch.tensor(linear.bias.numpy().reshape(-1)))
    return out


# Linear


def test_linear_parameter_shapes_and_init():
    np.random.seed(0)
    linear = nn.Linear(400, 300)
    assert isinstance(linear.weight, nn.Parameter) and isinstance(linear.bias, nn.Parameter)
    assert linear.weight.shape == (400, 300) and linear.bias.shape == (1, 300)
    assert linear.weight.requires_grad and linear.bias.requires_grad
    # Kaiming-uniform (relu gain) with fan_in = in_features
    bound = np.sqrt(6.0 / 400)
    w = linear.weight.numpy()
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert not np.allclose(linear.bias.numpy(), 0.0)
    assert {id(p) for p in linear.parameters()} == {id(linear.weight), id(linear.bias)}


@pytest.mark.parametrize("lead", [(6,), (2, 3), ()])
def test_linear_matches_torch(lead, device):
    np.random.seed(1)
    linear = nn.Linear(5, 7, device=device)
    assert linear.weight.device == device and linear.bias.device == device
    reference = torch_linear(linear)
    x, x_torch = tensors(np.random.randn(*lead, 5), device)
    y, y_torch = linear(x), reference(x_torch)
    assert y.device == device
    close(y, y_torch)
    backward_both(y, y_torch)
    close(x.grad, x_torch.grad)
    close(linear.weight.grad, reference.weight.grad.T)
    close(linear.bias.grad, reference.bias.grad.reshape(1, -1))


def test_linear_without_bias():
    np.random.seed(2)
    linear = nn.Linear(4, 3, bias=False)
    assert linear.bias is None
    assert len(linear.parameters()) == 1 and linear.parameters()[0] is linear.weight
    reference = torch_linear(linear)
    x, x_torch = tensors(np.random.randn(8, 4))
    y, y_torch = linear(x), reference(x_torch)
    close(y, y_torch)
    backward_both(y, y_torch)
    close(x.grad, x_torch.grad)
    close(linear.weight.grad, reference.weight.grad.T)


def test_linear_rejects_the_wrong_input_size():
    with pytest.raises(ValueError, match="Linear"):
        nn.Linear(4, 3)(ndl.Tensor(np.zeros((2, 5))))


# Activations, Flatten, Identity, Sequential, Residual

ACTIVATIONS = [(nn.ReLU, torch.relu), (nn.Tanh, torch.tanh), (nn.Sigmoid, torch.sigmoid)]


@pytest.mark.parametrize("module, reference", ACTIVATIONS)
def test_activations_match_torch(module, reference):
    np.random.seed(3)
    # ordinary values plus saturating ones at both ends
    values = np.concatenate([np.random.randn(3, 8) * 2, [[-60.0, -20.0, -5.0, -1e-3, 1e-3, 5.0, 20.0, 60.0]]])
    x, x_torch = tensors(values)
    y, y_torch = module()(x), reference(x_torch)
    close(y, y_torch)
    assert np.isfinite(y.numpy()).all()
    backward_both(y, y_torch)
    close(x.grad, x_torch.grad)


def test_flatten():
    x, x_torch = tensors(np.random.randn(2, 3, 4))
    y, y_torch = nn.Flatten()(x), torch.flatten(x_torch, 1)
    assert y.shape == (2, 12)
    close(y, y_torch)
    backward_both(y, y_torch)
    close(x.grad, x_torch.grad)
    assert nn.Flatten()(ndl.Tensor(np.zeros((5, 2)))).shape == (5, 2)


def test_flatten_of_a_transposed_view():
    values = np.random.randn(3, 4, 2).astype(np.float32)
    x = ndl.transpose(ndl.Tensor(values), (0, 2))  # (2, 4, 3), not contiguous
    np.testing.assert_array_equal(nn.Flatten()(x).numpy(), values.transpose(2, 1, 0).reshape(2, 12))


def test_identity_returns_its_input():
    x = ndl.Tensor(np.random.randn(3, 2))
    assert nn.Identity()(x) is x
    assert nn.Identity().parameters() == []


def test_sequential_matches_torch():
    np.random.seed(4)
    first, second = nn.Linear(6, 5), nn.Linear(5, 3)
    model = nn.Sequential(first, nn.ReLU(), second, nn.Tanh())
    reference = torch.nn.Sequential(torch_linear(first), torch.nn.ReLU(), torch_linear(second), torch.nn.Tanh())
    x, x_torch = tensors(np.random.randn(4, 6))
    y, y_torch = model(x), reference(x_torch)
    close(y, y_torch)
    backward_both(y, y_torch)
    close(x.grad, x_torch.grad)
    close(first.weight.grad, reference[0].weight.grad.T)
    close(first.bias.grad, reference[0].bias.grad.reshape(1, -1))
    close(second.weight.grad, reference[2].weight.grad.T)
    close(second.bias.grad, reference[2].bias.grad.reshape(1, -1))
    assert [id(p) for p in model.parameters()] == [id(first.weight), id(first.bias), id(second.weight),
                                                   id(second.bias)]


def test_empty_sequential_is_the_identity():
    x = ndl.Tensor(np.random.randn(2, 3))
    np.testing.assert_array_equal(nn.Sequential()(x).numpy(), x.numpy())


def test_residual_matches_torch():
    np.random.seed(5)
    linear = nn.Linear(4, 4)
    model = nn.Residual(nn.Sequential(linear, nn.Tanh()))
    reference = torch.nn.Sequential(torch_linear(linear), torch.nn.Tanh())
    x, x_torch = tensors(np.random.randn(3, 4))
    y, y_torch = model(x), reference(x_torch) + x_torch
    close(y, y_torch)
    backward_both(y, y_torch)
    close(x.grad, x_torch.grad)
    close(linear.weight.grad, reference[0].weight.grad.T)
    assert len(model.parameters()) == 2


# SoftmaxLoss


@pytest.mark.parametrize("scale", [1.0, 3.0, 1000.0])
def test_softmax_loss_matches_cross_entropy(scale, device):
    np.random.seed(6)
    logits, logits_torch = tensors(np.random.randn(8, 5) * scale, device)
    labels = np.random.randint(0, 5, size=8)
    loss = nn.SoftmaxLoss()(logits, ndl.Tensor(labels, device=device, requires_grad=False))
    loss_torch = F.cross_entropy(logits_torch, torch.tensor(labels))
    assert loss.shape == ()
    close(loss, loss_torch, rtol=1e-5)
    assert np.isfinite(loss.numpy())
    loss.backward()
    loss_torch.backward()
    close(logits.grad, logits_torch.grad)


def test_softmax_loss_with_an_upstream_gradient_and_one_class_row():
    logits, logits_torch = tensors(np.random.randn(1, 3))
    loss = nn.SoftmaxLoss()(logits, ndl.Tensor([2.0], requires_grad=False))
    loss_torch = F.cross_entropy(logits_torch, torch.tensor([2]))
    close(loss, loss_torch)
    loss.backward(ndl.Tensor(np.array(2.5, dtype=np.float32), requires_grad=False))
    (loss_torch * 2.5).backward()
    close(logits.grad, logits_torch.grad)


# BatchNorm1d


def batchnorm_pair(dim, seed, momentum=0.1, device=None):
    """A needle BatchNorm1d with random (non-trivial) weight and bias, and torch's copy."""
    rng = np.random.default_rng(seed)
    norm = nn.BatchNorm1d(dim, eps=1e-5, momentum=momentum, device=device)
    norm.weight = nn.Parameter(rng.standard_normal(dim).astype(np.float32), device=device)
    norm.bias = nn.Parameter(rng.standard_normal(dim).astype(np.float32), device=device)
    reference = torch.nn.BatchNorm1d(dim, eps=1e-5, momentum=momentum)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor(norm.weight.numpy()))
        reference.bias.copy_(torch.tensor(norm.bias.numpy()))
    return norm, reference


def test_batchnorm_parameters_and_buffers():
    norm = nn.BatchNorm1d(4)
    assert norm.eps == 1e-5 and norm.momentum == 0.1
    np.testing.assert_array_equal(norm.weight.numpy(), np.ones(4))
    np.testing.assert_array_equal(norm.bias.numpy(), np.zeros(4))
    np.testing.assert_array_equal(norm.running_mean.numpy(), np.zeros(4))
    np.testing.assert_array_equal(norm.running_var.numpy(), np.ones(4))
    assert {id(p) for p in norm.parameters()} == {id(norm.weight), id(norm.bias)}


@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_batchnorm_train_mode_matches_torch(momentum, device):
    np.random.seed(7)
    norm, reference = batchnorm_pair(6, seed=7, momentum=momentum, device=device)
    assert norm.running_mean.device == device and norm.running_var.device == device
    for step in range(3):
        norm.weight.grad = norm.bias.grad = None
        reference.zero_grad()
        x, x_torch = tensors(np.random.randn(16, 6) * 2 + np.arange(6), device)
        y, y_torch = norm(x), reference(x_torch)
        close(y, y_torch)
        backward_both(y, y_torch, seed=step)
        close(x.grad, x_torch.grad, atol=1e-4)
        close(norm.weight.grad, reference.weight.grad, atol=1e-4)
        close(norm.bias.grad, reference.bias.grad, atol=1e-4)
        # torch's running_var uses the unbiased batch variance
        close(norm.running_mean, reference.running_mean)
        close(norm.running_var, reference.running_var)
    assert not norm.running_mean.requires_grad and norm.running_mean.op is None
    assert not norm.running_var.requires_grad and norm.running_var.op is None


def test_batchnorm_eval_mode_uses_running_statistics():
    np.random.seed(8)
    norm, reference = batchnorm_pair(5, seed=8)
    for _ in range(4):
        batch = (np.random.randn(10, 5) * 3 + 1).astype(np.float32)
        norm(ndl.Tensor(batch))
        reference(torch.tensor(batch))
    norm.eval()
    reference.eval()
    mean, var = norm.running_mean.numpy(), norm.running_var.numpy()
    x, x_torch = tensors(np.random.randn(7, 5))
    y, y_torch = norm(x), reference(x_torch)
    close(y, y_torch)
    # eval mode normalises by the running statistics and leaves them alone
    np.testing.assert_array_equal(norm.running_mean.numpy(), mean)
    np.testing.assert_array_equal(norm.running_var.numpy(), var)
    backward_both(y, y_torch)
    close(x.grad, x_torch.grad)
    close(norm.weight.grad, reference.weight.grad)
    close(norm.bias.grad, reference.bias.grad)


# LayerNorm1d


@pytest.mark.parametrize("shape", [(6, 10), (2, 3, 10)])
def test_layernorm_matches_torch(shape, device):
    np.random.seed(9)
    rng = np.random.default_rng(9)
    norm = nn.LayerNorm1d(10, device=device)
    norm.weight = nn.Parameter(rng.standard_normal(10).astype(np.float32), device=device)
    norm.bias = nn.Parameter(rng.standard_normal(10).astype(np.float32), device=device)
    reference = torch.nn.LayerNorm(10, eps=1e-5)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor(norm.weight.numpy()))
        reference.bias.copy_(torch.tensor(norm.bias.numpy()))
    x, x_torch = tensors(np.random.randn(*shape) * 3 + 2, device)
    y, y_torch = norm(x), reference(x_torch)
    close(y, y_torch)
    backward_both(y, y_torch)
    close(x.grad, x_torch.grad, atol=1e-4)
    close(norm.weight.grad, reference.weight.grad, atol=1e-4)
    close(norm.bias.grad, reference.bias.grad, atol=1e-4)


def test_layernorm_defaults():
    norm = nn.LayerNorm1d(3)
    assert norm.eps == 1e-5
    np.testing.assert_array_equal(norm.weight.numpy(), np.ones(3))
    np.testing.assert_array_equal(norm.bias.numpy(), np.zeros(3))
    assert len(norm.parameters()) == 2


# Dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_train_zeroes_about_p_and_scales_the_rest(p, device):
    np.random.seed(10)
    x = ndl.Tensor(np.random.uniform(1.0, 2.0, size=(200, 500)), device=device)
    y = nn.Dropout(p)(x)
    out, values = y.numpy(), x.numpy()
    dropped = out == 0
    assert abs(dropped.mean() - p) < 0.01
    np.testing.assert_allclose(out[~dropped], values[~dropped] / (1 - p), rtol=1e-6)
    # the gradient flows through the kept entries only, with the same scale
    y.backward()
    np.testing.assert_allclose(x.grad.numpy(), (~dropped) / (1 - p), rtol=1e-6)


def test_dropout_masks_use_numpys_global_rng():
    x = ndl.Tensor(np.ones((20, 30)))
    np.random.seed(11)
    a = nn.Dropout(0.5)(x).numpy()
    b = nn.Dropout(0.5)(x).numpy()
    np.random.seed(11)
    np.testing.assert_array_equal(nn.Dropout(0.5)(x).numpy(), a)
    assert not np.array_equal(a, b)


def test_dropout_eval_and_p_zero_are_the_identity():
    x = ndl.Tensor(np.random.randn(30, 40))
    dropout = nn.Dropout(0.5)
    dropout.eval()
    np.testing.assert_array_equal(dropout(x).numpy(), x.numpy())
    np.testing.assert_array_equal(nn.Dropout(0.0)(x).numpy(), x.numpy())
    assert nn.Dropout().p == 0.5


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_p_outside_unit_interval_is_a_value_error(p):
    with pytest.raises(ValueError, match="Dropout"):
        nn.Dropout(p)


# Module bookkeeping


class Leaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(np.zeros(2))


class Tree(nn.Module):
    def __init__(self, shared):
        super().__init__()
        self.direct = nn.Parameter(np.zeros(1))
        self.listed = [nn.Parameter(np.zeros(3)), Leaf()]
        self.tupled = (Leaf(), nn.Parameter(np.zeros(4)))
        self.mapped = {"a": nn.Parameter(np.zeros(5)), "b": [Leaf(), {"c": Leaf()}]}
        self.child = nn.Sequential(Leaf(), nn.Sequential(Leaf()))
        self.shared, self.shared_again, self.shared_in_list = shared, shared, [shared]
        self.buffer = ndl.Tensor(np.zeros(6))  # a plain Tensor is not a parameter
        self.number, self.text = 3, "text"


def test_parameters_are_found_everywhere_and_listed_once():
    shared = nn.Parameter(np.zeros(7))
    tree = Tree(shared)
    expected = [tree.direct, tree.listed[0], tree.listed[1].w, tree.tupled[0].w, tree.tupled[1],
                tree.mapped["a"], tree.mapped["b"][0].w, tree.mapped["b"][1]["c"].w,
                tree.child.modules[0].w, tree.child.modules[1].modules[0].w, shared]
    params = tree.parameters()
    assert len(params) == len(expected) == len({id(p) for p in params})
    assert {id(p) for p in params} == {id(p) for p in expected}
    assert all(isinstance(p, nn.Parameter) for p in params)
    assert id(tree.buffer) not in {id(p) for p in params}


def test_a_shared_module_is_listed_once():
    linear = nn.Linear(3, 3)
    model = nn.Sequential(linear, nn.ReLU(), linear)
    assert len(model.parameters()) == 2


def test_train_and_eval_reach_every_sub_module():
    tree = Tree(nn.Parameter(np.zeros(1)))
    modules = [tree.listed[1], tree.tupled[0], tree.mapped["b"][0], tree.mapped["b"][1]["c"], tree.child,
               tree.child.modules[0], tree.child.modules[1], tree.child.modules[1].modules[0]]
    assert tree.training and all(m.training for m in modules)
    assert tree.eval() is tree
    assert not tree.training and not any(m.training for m in modules)
    assert tree.train() is tree
    assert tree.training and all(m.training for m in modules)


def test_eval_switches_batchnorm_and_dropout_inside_a_model():
    np.random.seed(12)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.ReLU())
    x = ndl.Tensor(np.random.randn(10, 4))
    model(x)
    model.eval()
    mean = model.modules[1].running_mean.numpy()
    a, b = model(x).numpy(), model(x).numpy()
    np.testing.assert_array_equal(a, b)  # no dropout, no batch statistics
    np.testing.assert_array_equal(model.modules[1].running_mean.numpy(), mean)


def test_parameter_is_a_tensor_that_requires_grad():
    p = nn.Parameter(np.ones((2, 2)))
    assert isinstance(p, ndl.Tensor) and p.requires_grad and p.is_leaf()
