"""Tests for needle.optim: SGD against the API's momentum formula (a numpy reference; it is not torch's),
Adam and clip_grad_norm against torch, graph hygiene, reset_grad, state round trips, and a tiny training run."""

import inspect

import numpy as np
import pytest
import torch

import needle as ndl
from needle import nn, optim
from needle.backend_ndarray import NDArray

ATOL, RTOL = 1e-6, 1e-5


# A quadratic with a closed-form gradient, so SGD can be checked against plain numpy.


def quadratic_problem(seed):
    """Parameters, targets and weights of loss = sum_k sum(c_k * (w_k - t_k)^2); grad_k = 2 c_k (w_k - t_k)."""
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (5,), (1, 2)]
    start = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    targets = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    weights = [rng.uniform(0.5, 2.0, s).astype(np.float32) for s in shapes]
    return start, targets, weights


def quadratic_loss(params, targets, weights):
    loss = None
    for w, t, c in zip(params, targets, weights):
        term = ((w - ndl.Tensor(t, requires_grad=False)) ** 2 * ndl.Tensor(c, requires_grad=False)).sum()
        loss = term if loss is None else loss + term
    return loss


@pytest.mark.parametrize("lr, momentum, weight_decay", [(0.1, 0.0, 0.0), (0.05, 0.9, 0.0), (0.1, 0.0, 0.2),
                                                        (0.07, 0.5, 0.05)])
def test_sgd_follows_the_api_formula(lr, momentum, weight_decay):
    start, targets, weights = quadratic_problem(0)
    params = [nn.Parameter(w) for w in start]
    opt = optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    expected = [w.astype(np.float64) for w in start]
    velocity = [np.zeros_like(w) for w in expected]
    for _ in range(6):
        opt.reset_grad()
        quadratic_loss(params, targets, weights).backward()
        opt.step()
        for k, (w, t, c) in enumerate(zip(expected, targets, weights)):
            g = 2 * c * (w - t) + weight_decay * w
            velocity[k] = momentum * velocity[k] + (1 - momentum) * g
            expected[k] = w - lr * velocity[k]
        for p, w in zip(params, expected):
            np.testing.assert_allclose(p.numpy(), w, atol=ATOL, rtol=RTOL)


def test_sgd_defaults():
    params = inspect.signature(optim.SGD).parameters
    assert (params["lr"].default, params["momentum"].default, params["weight_decay"].default) == (0.01, 0.0, 0.0)
    params = inspect.signature(optim.Adam).parameters
    assert [params[k].default for k in ["lr", "beta1", "beta2", "eps", "weight_decay"]] == [0.01, 0.9, 0.999,
                                                                                            1e-8, 0.0]
    assert inspect.signature(optim.Optimizer.clip_grad_norm).parameters["max_norm"].default == 0.25


# A small classifier, identical in needle and torch.


def classifier_pair(seed, device=None):
    np.random.seed(seed)
    first, second = nn.Linear(6, 8, device=device), nn.Linear(8, 3, device=device)
    model = nn.Sequential(first, nn.Tanh(), second)
    reference = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for linear, copy in [(first, reference[0]), (second, reference[2])]:
            copy.weight.copy_(torch.tensor(linear.weight.numpy().T))
            copy.bias.copy_(torch.tensor(linear.bias.numpy().reshape(-1)))
    return model, reference


def needle_view(reference):
    """torch's parameters in needle's layout and order: W (in, out), b (1, out)."""
    return [p.detach().numpy().T if p.ndim == 2 else p.detach().numpy().reshape(1, -1)
            for p in reference.parameters()]


def train_both(model, opt, reference, opt_torch, steps, seed=0):
    rng = np.random.default_rng(seed)
    loss_fn = nn.SoftmaxLoss()
    for _ in range(steps):
        x = rng.standard_normal((10, 6)).astype(np.float32)
        y = rng.integers(0, 3, size=10)
        device = model.parameters()[0].device
        opt.reset_grad()
        loss_fn(model(ndl.Tensor(x, device=device)), ndl.Tensor(y, device=device, requires_grad=False)).backward()
        opt.step()
        opt_torch.zero_grad()
        torch.nn.functional.cross_entropy(reference(torch.tensor(x)), torch.tensor(y)).backward()
        opt_torch.step()
        for p, expected in zip(model.parameters(), needle_view(reference)):
            np.testing.assert_allclose(p.numpy(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_plain_sgd_matches_torch(weight_decay):
    # with momentum 0 the API's formula is torch's
    model, reference = classifier_pair(1)
    opt = optim.SGD(model.parameters(), lr=0.3, weight_decay=weight_decay)
    train_both(model, opt, reference, torch.optim.SGD(reference.parameters(), lr=0.3, weight_decay=weight_decay),
               steps=5)


@pytest.mark.parametrize("kwargs", [{}, {"lr": 0.05, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6},
                                    {"lr": 0.02, "weight_decay": 0.1}])
def test_adam_matches_torch(kwargs, device):
    model, reference = classifier_pair(2, device)
    opt = optim.Adam(model.parameters(), **kwargs)
    opt_torch = torch.optim.Adam(reference.parameters(), lr=kwargs.get("lr", 0.01),
                                 betas=(kwargs.get("beta1", 0.9), kwargs.get("beta2", 0.999)),
                                 eps=kwargs.get("eps", 1e-8), weight_decay=kwargs.get("weight_decay", 0.0))
    train_both(model, opt, reference, opt_torch, steps=6)


def test_adam_adds_eps_outside_the_square_root():
    # With |g| == eps the step is lr * g / (|g| + eps) = lr / 2; eps inside the root would give ~lr * 1e-4.
    w = nn.Parameter(np.zeros(3))
    w_torch = torch.zeros(3, requires_grad=True)
    opt, opt_torch = optim.Adam([w], lr=0.1), torch.optim.Adam([w_torch], lr=0.1)
    for _ in range(3):
        opt.reset_grad()
        (w * 1e-8).sum().backward()
        opt.step()
        opt_torch.zero_grad()
        (w_torch * 1e-8).sum().backward()
        opt_torch.step()
        np.testing.assert_allclose(w.numpy(), w_torch.detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(w.numpy(), -0.15, rtol=1e-5)


def test_adam_counts_steps_per_parameter_as_torch():
    # A parameter without a gradient is skipped, and its bias correction starts at its own first step.
    start = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)
    a, b = nn.Parameter(start[0]), nn.Parameter(start[1])
    a_torch, b_torch = (torch.tensor(s, requires_grad=True) for s in start)
    opt, opt_torch = optim.Adam([a, b], lr=0.1), torch.optim.Adam([a_torch, b_torch], lr=0.1)
    for step in range(4):
        opt.reset_grad()
        opt_torch.zero_grad()
        loss = (a * a).sum() if step < 2 else (a * a).sum() + (b * b * b).sum()
        loss_torch = (a_torch ** 2).sum() if step < 2 else (a_torch ** 2).sum() + (b_torch ** 3).sum()
        loss.backward()
        loss_torch.backward()
        assert (b.grad is None) == (b_torch.grad is None)
        opt.step()
        opt_torch.step()
        np.testing.assert_allclose(a.numpy(), a_torch.detach().numpy(), atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(b.numpy(), b_torch.detach().numpy(), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("make", [lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
                                  lambda ps: optim.Adam(ps, lr=0.1, weight_decay=0.1)])
def test_parameters_without_a_gradient_are_left_alone(make):
    used, unused = nn.Parameter(np.ones(3)), nn.Parameter(np.ones(2))
    opt = make([used, unused])
    for _ in range(2):
        opt.reset_grad()
        (used * used).sum().backward()
        opt.step()
    np.testing.assert_array_equal(unused.numpy(), np.ones(2))
    assert not np.allclose(used.numpy(), 1.0)


# clip_grad_norm


@pytest.mark.parametrize("max_norm", [0.05, 1.0, 1e3])
def test_clip_grad_norm_matches_torch(max_norm):
    model, reference = classifier_pair(4)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((10, 6)).astype(np.float32) * 3
    y = rng.integers(0, 3, size=10)
    nn.SoftmaxLoss()(model(ndl.Tensor(x)), ndl.Tensor(y, requires_grad=False)).backward()
    torch.nn.functional.cross_entropy(reference(torch.tensor(x)), torch.tensor(y)).backward()
    opt = optim.SGD(model.parameters())
    before = [p.grad.numpy() for p in model.parameters()]
    norm = opt.clip_grad_norm(max_norm)
    norm_torch = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
    assert float(norm) == pytest.approx(float(norm_torch), rel=1e-5)
    grads_torch = [g.numpy().T if g.ndim == 2 else g.numpy().reshape(1, -1)
                   for g in (p.grad for p in reference.parameters())]
    for p, expected, old in zip(model.parameters(), grads_torch, before):
        np.testing.assert_allclose(p.grad.numpy(), expected, atol=1e-6, rtol=1e-5)
        if max_norm > float(norm_torch):
            np.testing.assert_array_equal(p.grad.numpy(), old)  # below the threshold nothing changes
        assert p.grad.is_leaf() and p.grad.dtype == "float32"
    clipped = np.sqrt(sum((p.grad.numpy().astype(np.float64) ** 2).sum() for p in model.parameters()))
    assert clipped <= max_norm * (1 + 1e-5)


def test_clip_grad_norm_skips_parameters_without_a_gradient():
    a, b = nn.Parameter(np.full(4, 3.0)), nn.Parameter(np.ones(2))
    (a * a).sum().backward()  # grad 2a = 6 each, norm 12
    opt = optim.Adam([a, b])
    assert opt.clip_grad_norm(1.2) == pytest.approx(12.0)
    np.testing.assert_allclose(a.grad.numpy(), np.full(4, 0.6), rtol=1e-5)
    assert b.grad is None


# Graph hygiene and reset_grad


OPTIMISERS = [lambda ps: optim.SGD(ps, lr=0.1), lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
              lambda ps: optim.Adam(ps, lr=0.01), lambda ps: optim.Adam(ps, lr=0.01, weight_decay=0.01)]


@pytest.mark.parametrize("make", OPTIMISERS)
def test_updates_do_not_grow_the_graph(make, device):
    model, _ = classifier_pair(5, device)
    opt = make(model.parameters())
    x = ndl.Tensor(np.random.randn(4, 6), device=device, requires_grad=False)
    y = ndl.Tensor([0.0, 1.0, 2.0, 1.0], device=device, requires_grad=False)
    for _ in range(3):
        opt.reset_grad()
        nn.SoftmaxLoss()(model(x), y).backward()
        opt.clip_grad_norm(0.5)
        opt.step()
        for p in model.parameters():
            assert p.is_leaf() and p.op is None and len(p.inputs) == 0
            assert p.requires_grad and isinstance(p, nn.Parameter)
            assert isinstance(p.realize_cached_data(), NDArray)
            assert p.dtype == "float32" and p.device == device
            assert p.grad.is_leaf() and len(p.grad.inputs) == 0


def test_reset_grad_clears_gradients():
    model, _ = classifier_pair(6)
    opt = optim.SGD(model.parameters())
    x = ndl.Tensor(np.random.randn(4, 6), requires_grad=False)
    y = ndl.Tensor([0.0, 1.0, 2.0, 1.0], requires_grad=False)
    nn.SoftmaxLoss()(model(x), y).backward()
    once = [p.grad.numpy() for p in model.parameters()]
    nn.SoftmaxLoss()(model(x), y).backward()
    for p, g in zip(model.parameters(), once):  # without a reset, gradients accumulate
        np.testing.assert_allclose(p.grad.numpy(), 2 * g, rtol=1e-6, atol=1e-7)
    opt.reset_grad()
    assert all(p.grad is None for p in model.parameters())
    nn.SoftmaxLoss()(model(x), y).backward()
    for p, g in zip(model.parameters(), once):
        np.testing.assert_allclose(p.grad.numpy(), g, rtol=1e-6, atol=1e-7)


def test_optimiser_rejects_non_tensors():
    with pytest.raises(TypeError):
        optim.SGD([np.zeros(3)])


# State round trips: a fresh optimiser loaded from state_dict continues as the original would.


@pytest.mark.parametrize("make", OPTIMISERS)
def test_state_dict_round_trip(make):
    start, targets, weights = quadratic_problem(7)

    def run(params, opt, steps):
        for _ in range(steps):
            opt.reset_grad()
            quadratic_loss(params, targets, weights).backward()
            opt.step()

    straight = [nn.Parameter(w) for w in start]
    run(straight, make(straight), 5)
    first = [nn.Parameter(w) for w in start]
    opt = make(first)
    run(first, opt, 2)
    resumed = [nn.Parameter(p.numpy()) for p in first]
    opt_resumed = make(resumed)
    opt_resumed.load_state_dict(opt.state_dict())
    run(resumed, opt_resumed, 3)
    for p, q in zip(resumed, straight):
        np.testing.assert_allclose(p.numpy(), q.numpy(), atol=ATOL, rtol=RTOL)


# End to end


def test_linear_softmax_training_reduces_the_loss():
    rng = np.random.default_rng(8)
    true_weights = rng.standard_normal((4, 3))
    x = rng.standard_normal((120, 4)).astype(np.float32)
    labels = (x @ true_weights).argmax(axis=1)  # linearly separable
    np.random.seed(8)
    model = nn.Linear(4, 3)
    opt = optim.SGD(model.parameters(), lr=0.5)
    loss_fn = nn.SoftmaxLoss()
    inputs, targets = ndl.Tensor(x, requires_grad=False), ndl.Tensor(labels, requires_grad=False)
    losses = []
    for _ in range(30):
        opt.reset_grad()
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        opt.step()
        losses.append(float(loss.numpy()))
    assert losses[-1] < 0.5 * losses[0]
    assert all(b < a for a, b in zip(losses, losses[1:]))
    accuracy = (model(inputs).numpy().argmax(axis=1) == labels).mean()
    assert accuracy > 0.9
