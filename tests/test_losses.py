"""The losses of krrst.losses against reference computations (scikit-learn, NumPy, by hand, finite differences)."""

import math

import numpy as np
import pytest
import torch

from krrst.infra.errors import KrrstError
from krrst.losses import (
    barlow_twins_loss,
    krr_predict,
    krr_st_loss,
    parameter_matching_loss,
    simclr_loss,
    soft_cross_entropy,
)

# --------------------------------------------------------------------------- KRR-ST


def _random_problem(m=12, n=20, p=30, d=5, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    synthetic_features = torch.randn(m, p, generator=generator, dtype=dtype)
    real_features = torch.randn(n, p, generator=generator, dtype=dtype)
    synthetic_targets = torch.randn(m, d, generator=generator, dtype=dtype)
    real_targets = torch.randn(n, d, generator=generator, dtype=dtype)
    return synthetic_features, synthetic_targets, real_features, real_targets


def _with_ones(features: np.ndarray) -> np.ndarray:
    return np.concatenate([features, np.ones((features.shape[0], 1))], axis=1)


@pytest.mark.parametrize("ridge", [1e-6, 1e-2, 0.5])
def test_prediction_matches_sklearn_kernel_ridge(ridge):
    from sklearn.kernel_ridge import KernelRidge

    synthetic_features, synthetic_targets, real_features, _ = _random_problem()
    synthetic = _with_ones(synthetic_features.numpy())
    real = _with_ones(real_features.numpy())
    regulariser = ridge * np.trace(synthetic @ synthetic.T)
    kernel_ridge = KernelRidge(kernel="linear", alpha=regulariser).fit(synthetic, synthetic_targets.numpy())
    reference = kernel_ridge.predict(real)

    predictions = krr_predict(synthetic_features, synthetic_targets, real_features, ridge=ridge)
    assert predictions.dtype == torch.float64
    np.testing.assert_allclose(predictions.numpy(), reference, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("m,p", [(12, 30), (40, 8)])  # fewer and more samples than features
def test_prediction_matches_primal_ridge_solution(m, p):
    ridge = 1e-3
    synthetic_features, synthetic_targets, real_features, _ = _random_problem(m=m, p=p, seed=1)
    synthetic = _with_ones(synthetic_features.numpy())
    real = _with_ones(real_features.numpy())
    regulariser = ridge * np.trace(synthetic @ synthetic.T)
    primal_weights = np.linalg.solve(
        synthetic.T @ synthetic + regulariser * np.eye(synthetic.shape[1]), synthetic.T @ synthetic_targets.numpy()
    )
    reference = real @ primal_weights

    predictions = krr_predict(synthetic_features, synthetic_targets, real_features, ridge=ridge)
    np.testing.assert_allclose(predictions.numpy(), reference, rtol=1e-7, atol=1e-9)


def test_loss_is_mean_squared_error_over_all_elements():
    ridge = 1e-2
    synthetic_features, synthetic_targets, real_features, real_targets = _random_problem(seed=2)
    synthetic = _with_ones(synthetic_features.numpy())
    real = _with_ones(real_features.numpy())
    kernel = synthetic @ synthetic.T
    weights = np.linalg.solve(kernel + ridge * np.trace(kernel) * np.eye(len(kernel)), synthetic_targets.numpy())
    residual = real @ synthetic.T @ weights - real_targets.numpy()
    reference = (residual**2).sum() / residual.size

    loss = krr_st_loss(synthetic_features, synthetic_targets, real_features, real_targets, ridge=ridge)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(reference, rel=1e-10)


def test_float32_kernel_is_default_and_float64_is_an_option():
    synthetic_features, synthetic_targets, real_features, real_targets = _random_problem(dtype=torch.float32, seed=3)
    loss32 = krr_st_loss(synthetic_features, synthetic_targets, real_features, real_targets, ridge=1e-2)
    loss64 = krr_st_loss(
        synthetic_features, synthetic_targets, real_features, real_targets, ridge=1e-2, kernel_dtype=torch.float64
    )
    assert loss32.dtype == torch.float32
    assert loss64.dtype == torch.float64
    as_double = [t.double() for t in (synthetic_features, synthetic_targets, real_features, real_targets)]
    reference = krr_st_loss(*as_double, ridge=1e-2)
    assert loss64.item() == pytest.approx(reference.item(), rel=1e-12)
    # float32: forming the kernels and predictions sums p + m + n terms (<= that many u32 each), and the ridge
    # solve amplifies by the condition number of F_s F_s^T + lambda I (7.5 here): the bound, from the problem.
    m, p = synthetic_features.shape
    bias_column = torch.ones(m, 1, dtype=torch.float64)
    kernel = torch.cat([as_double[0], bias_column], 1) @ torch.cat([as_double[0], bias_column], 1).T
    condition = float(torch.linalg.cond(kernel + 1e-2 * kernel.trace() * torch.eye(m, dtype=torch.float64)))
    bound = (p + 1 + m + len(real_features)) * condition * 2.0**-24
    assert loss32.item() == pytest.approx(reference.item(), rel=bound)


class _TinyFeatureNet(torch.nn.Module):
    """conv + ReLU + flatten in float64: enough non-linearity for a gradient check through a network."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(4)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1).double()
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator, dtype=torch.float64) * 0.3)
            self.conv.bias.copy_(torch.randn(4, generator=generator, dtype=torch.float64) * 0.1)

    def forward(self, images):
        return torch.tanh(self.conv(images)).flatten(1)


def test_gradcheck_wrt_synthetic_images_and_targets():
    net = _TinyFeatureNet()
    generator = torch.Generator().manual_seed(5)
    synthetic_images = torch.randn(6, 3, 4, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    synthetic_targets = torch.randn(6, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    real_images = torch.randn(9, 3, 4, 4, generator=generator, dtype=torch.float64)
    real_targets = torch.randn(9, 3, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        first = _with_ones(net(synthetic_images).numpy())
    fixed_regulariser = 1e-2 * np.trace(first @ first.T)

    def loss_with_lambda_held_fixed(images, targets):
        # λ = ridge · trace(K) with the trace detached: the gradient is that of the loss at a
        # fixed λ. Finite differences would move the trace, so rescale ridge to hold λ fixed.
        features = net(images)
        with torch.no_grad():
            trace = (features**2).sum() + features.shape[0]
        ridge = fixed_regulariser / trace.item()
        return krr_st_loss(features, targets, net(real_images), real_targets, ridge=ridge, kernel_dtype=torch.float64)

    assert torch.autograd.gradcheck(loss_with_lambda_held_fixed, (synthetic_images, synthetic_targets), eps=1e-6)


def test_trace_is_detached_in_the_gradient():
    """The gradient w.r.t. X_s ignores dλ/dX_s: compare with the analytic λ-fixed and λ-live gradients."""
    synthetic_features, synthetic_targets, real_features, real_targets = _random_problem(seed=6)
    synthetic_features.requires_grad_(True)
    ridge = 0.05
    loss = krr_st_loss(synthetic_features, synthetic_targets, real_features, real_targets, ridge=ridge)
    (ours,) = torch.autograd.grad(loss, synthetic_features)

    def manual(live_trace: bool):
        features = synthetic_features.detach().clone().requires_grad_(True)
        synthetic = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype)], 1)
        real = torch.cat([real_features, torch.ones(len(real_features), 1, dtype=features.dtype)], 1)
        kernel = synthetic @ synthetic.T
        trace = torch.trace(kernel) if live_trace else torch.trace(kernel).detach()
        identity = torch.eye(len(kernel), dtype=features.dtype)
        weights = torch.linalg.solve(kernel + ridge * trace * identity, synthetic_targets)
        manual_loss = ((real @ synthetic.T @ weights - real_targets) ** 2).mean()
        return torch.autograd.grad(manual_loss, features)[0]

    torch.testing.assert_close(ours, manual(live_trace=False), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(ours, manual(live_trace=True), rtol=1e-3, atol=1e-6)


def test_gradient_reaches_targets_and_features_in_float32():
    synthetic_features, synthetic_targets, real_features, real_targets = _random_problem(dtype=torch.float32, seed=7)
    synthetic_features.requires_grad_(True)
    synthetic_targets.requires_grad_(True)
    loss = krr_st_loss(synthetic_features, synthetic_targets, real_features, real_targets)
    loss.backward()
    assert synthetic_features.grad.abs().sum() > 0 and synthetic_targets.grad.abs().sum() > 0
    assert torch.isfinite(synthetic_features.grad).all() and torch.isfinite(synthetic_targets.grad).all()


def test_singular_kernel_is_a_clear_error_not_nan():
    # Identical synthetic features make K = F_s F_sᵀ rank one; with ridge 0 it is singular.
    features = torch.zeros(5, 7, dtype=torch.float64)
    targets = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(KrrstError, match=r"not positive definite \(m=5, ridge=0.0.*kernel_dtype=float64"):
        krr_predict(features, targets, torch.randn(4, 7, dtype=torch.float64), ridge=0.0)
    with pytest.raises(KrrstError, match="not positive definite"):
        krr_st_loss(features.float(), targets.float(), torch.randn(4, 7), torch.randn(4, 3), ridge=-1.0)


def test_ridge_makes_a_duplicated_set_solvable():
    features = torch.randn(1, 7, dtype=torch.float64).repeat(5, 1)
    targets = torch.randn(5, 3, dtype=torch.float64)
    real_features, real_targets = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    loss = krr_st_loss(features, targets, real_features, real_targets)
    assert torch.isfinite(loss)
    # With identical inputs, ridge regression predicts through the mean of their targets.
    prediction = krr_predict(features, targets, features[:1], ridge=1e-6)
    # s·m / (s·m + λ) with s = |f|² + 1 and λ = ridge · m · s: the mean shrunk by 1 / (1 + ridge).
    torch.testing.assert_close(prediction[0], targets.mean(0) / (1 + 1e-6), rtol=1e-7, atol=1e-9)


def test_features_of_any_shape_are_flattened():
    synthetic_features, synthetic_targets, real_features, real_targets = _random_problem(p=24, seed=8)
    flat = krr_st_loss(synthetic_features, synthetic_targets, real_features, real_targets)
    shaped = krr_st_loss(
        synthetic_features.view(-1, 2, 3, 4), synthetic_targets, real_features.view(-1, 2, 3, 4), real_targets
    )
    assert flat.item() == pytest.approx(shaped.item(), rel=1e-12)


# --------------------------------------------------------------------------- SSL losses (the teacher's)


def _barlow_by_hand(a: np.ndarray, b: np.ndarray, lam: float, eps: float) -> float:
    n, d = a.shape
    std_a = (a - a.mean(0)) / np.sqrt(a.var(0) + eps)
    std_b = (b - b.mean(0)) / np.sqrt(b.var(0) + eps)
    total = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(std_a[k, i] * std_b[k, j] for k in range(n)) / n
            total += (1 - c_ij) ** 2 if i == j else lam * c_ij**2
    return total


def test_barlow_twins_loss_matches_hand_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(7, 5))
    b = a + 0.5 * rng.normal(size=(7, 5))
    expected = _barlow_by_hand(a, b, lam=0.3, eps=1e-5)
    got = barlow_twins_loss(torch.from_numpy(a), torch.from_numpy(b), lambda_offdiag=0.3)
    assert got.item() == pytest.approx(expected, rel=1e-10)
    scaled = barlow_twins_loss(torch.from_numpy(a), torch.from_numpy(b), lambda_offdiag=0.3, scale=0.1)
    assert scaled.item() == pytest.approx(0.1 * expected, rel=1e-10)


def test_barlow_twins_loss_is_zero_for_identical_decorrelated_embeddings():
    # Orthonormal columns that sum to zero, scaled to unit (biased) variance:
    # the cross-correlation of z with itself is the identity.
    n, d = 16, 6
    basis = np.linalg.qr(np.random.default_rng(1).normal(size=(n, d + 1)))[0]
    centred = basis - basis.mean(0)
    q = np.linalg.qr(centred)[0][:, :d]
    z = torch.from_numpy(q * math.sqrt(n))
    assert torch.allclose(z.mean(0), torch.zeros(d, dtype=z.dtype), atol=1e-12)
    assert torch.allclose(z.T @ z / n, torch.eye(d, dtype=z.dtype), atol=1e-12)
    # c is I to float64 rounding; the off-diagonal term is a difference of two sums of size ~d (cancellation),
    # so rounding leaves up to ~2 * d^2 * d * u64 of it: lambda * 2 * d^3 * 2^-53 = 2.5e-16 (a variance off by
    # n/(n-1) would give d / 16^2 = 0.023).
    assert barlow_twins_loss(z, z, eps=0.0).item() < 0.0051 * 2 * d**3 * 2.0**-53
    assert barlow_twins_loss(z, z).item() < 1e-8  # BatchNorm's eps leaves (1e-5)^2 per dim
    # and the loss sees correlation: a redundant copy of one dimension is penalised
    redundant = z.clone()
    redundant[:, 1] = redundant[:, 0]
    assert barlow_twins_loss(redundant, redundant, eps=0.0).item() > 0.0051


def test_barlow_twins_loss_gradcheck_float64():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(6, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(6, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: barlow_twins_loss(x, y, lambda_offdiag=0.0051), (a, b))


def _nt_xent_by_hand(a: np.ndarray, b: np.ndarray, temperature: float) -> float:
    u = np.concatenate([a, b])
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    n2 = u.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        positive = (i + n) % n2
        sims = [float(u[i] @ u[j]) / temperature for j in range(n2)]
        denominator = sum(math.exp(sims[j]) for j in range(n2) if j != i)
        total += -math.log(math.exp(sims[positive]) / denominator)
    return total / n2


def test_simclr_loss_matches_reference_and_gradcheck():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    got = simclr_loss(torch.from_numpy(a), torch.from_numpy(b), temperature=0.5)
    assert got.item() == pytest.approx(_nt_xent_by_hand(a, b, 0.5), rel=1e-10)
    ta = torch.from_numpy(a).requires_grad_(True)
    tb = torch.from_numpy(b).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: simclr_loss(x, y, 0.5), (ta, tb))


# --------------------------------------------------------------------------- knowledge distillation


def test_soft_cross_entropy_equals_hand_computation():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]

    def hand(temperature: float) -> float:
        total = 0.0
        for s_row, t_row in zip(student, teacher):
            t_exp = [math.exp(t / temperature) for t in t_row]
            s_exp = [math.exp(s / temperature) for s in s_row]
            p = [v / sum(t_exp) for v in t_exp]
            log_q = [math.log(v / sum(s_exp)) for v in s_exp]
            total += -sum(pi * lq for pi, lq in zip(p, log_q))
        return total / len(student) * temperature**2

    for temperature in (1.0, 2.0):
        value = soft_cross_entropy(torch.tensor(student), torch.tensor(teacher), temperature)
        assert value.item() == pytest.approx(hand(temperature), rel=1e-6)

    student_t = torch.tensor(student, requires_grad=True)
    teacher_t = torch.tensor(teacher, requires_grad=True)
    soft_cross_entropy(student_t, teacher_t).backward()
    assert teacher_t.grad is None and student_t.grad is not None


# --------------------------------------------------------------------------- trajectory matching (MKDT)


def test_parameter_matching_loss_and_its_gradient_against_the_closed_form():
    generator = torch.Generator().manual_seed(9)
    final, start, target = (torch.randn(17, generator=generator, dtype=torch.float64) for _ in range(3))
    a, s, t = final.numpy(), start.numpy(), target.numpy()
    denominator = float(((s - t) ** 2).sum())
    expected = float(((a - t) ** 2).sum()) / denominator

    final, start, target = (x.clone().requires_grad_(True) for x in (final, start, target))
    loss = parameter_matching_loss(final, start, target)
    assert loss.dim() == 0 and loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-12)

    # The denominator is a constant of the expert's two points: d loss / d final = 2 (a - t) / ||s - t||²,
    # and neither the start nor the target receives a gradient.
    grad_final, grad_start, grad_target = torch.autograd.grad(loss, (final, start, target), allow_unused=True)
    np.testing.assert_allclose(grad_final.numpy(), 2 * (a - t) / denominator, rtol=1e-12, atol=0)
    assert grad_start is None and grad_target is None
