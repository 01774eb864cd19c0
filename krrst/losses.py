"""The losses, as pure functions of tensors: each with its formula and citation.

- `krr_st_loss` / `krr_predict`: KRR-ST's outer loss and its closed-form
  kernel ridge regression (Lee et al., ICLR 2024);
- `barlow_twins_loss`, `simclr_loss`: the SSL teachers' losses;
- `parameter_matching_loss`: MTT's normalised trajectory distance (MKDT);
- `soft_cross_entropy`: knowledge distillation's soft-target loss.

None of them communicates across ranks: a distributed caller gathers the
embeddings first (`krrst.infra.distributed.all_gather_with_grad`).

KRR-ST objective: closed-form kernel ridge regression and the outer loss.

For a feature extractor `f`, the synthetic set `(X_s, Y_s)` defines a linear
head by ridge regression on `(f(X_s), Y_s)`. The outer loss asks that head to
predict the teacher's representations `g(X_t)` of real images. Both are
computed in kernel form, with an m x m system solved by Cholesky (never an
inverse), so the loss is differentiable in `X_s` (through the features) and in
`Y_s`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from krrst.infra.errors import KrrstError


def _with_bias_column(features: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    features = features.flatten(1).to(dtype)
    return torch.cat([features, features.new_ones(features.shape[0], 1)], dim=1)


def krr_predict(
    synthetic_features: torch.Tensor,
    synthetic_targets: torch.Tensor,
    real_features: torch.Tensor,
    ridge: float = 1e-6,
    kernel_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Predictions of the ridge-regression head fitted on the synthetic set.

    With `F_s = [f(X_s), 1]` (m x (p+1)), `F_t = [f(X_t), 1]` (n x (p+1)) and
    `K_ss = F_s F_sᵀ`, returns (n x d)::

        F_t F_sᵀ (K_ss + λ I)⁻¹ Y_s,   λ = ridge · trace(K_ss)   (trace detached)

    which equals the primal solution `F_t (F_sᵀ F_s + λ I)⁻¹ F_sᵀ Y_s`. The
    system is solved by Cholesky. The kernels are computed in `kernel_dtype`, or
    in the inputs' dtype when that is wider (float64 inputs stay float64).

    Raises `KrrstError` when `K_ss + λ I` is not positive definite (instead of
    letting NaNs into the synthetic set).
    """
    predictions, info = krr_predict_with_info(synthetic_features, synthetic_targets, real_features, ridge, kernel_dtype)
    check_cholesky(info, synthetic_features.shape[0], ridge, torch.promote_types(synthetic_features.dtype, kernel_dtype))
    return predictions


def krr_predict_with_info(
    synthetic_features: torch.Tensor,
    synthetic_targets: torch.Tensor,
    real_features: torch.Tensor,
    ridge: float = 1e-6,
    kernel_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`krr_predict` without the check: `(predictions, info)`, info != 0 where Cholesky failed.

    Reading `info` on the host forces a device synchronisation; the outer loop
    keeps it on the device and checks it only when it logs or saves
    (`check_cholesky`). Where info != 0 the predictions are meaningless.
    """
    dtype = torch.promote_types(synthetic_features.dtype, kernel_dtype)
    synthetic = _with_bias_column(synthetic_features, dtype)
    real = _with_bias_column(real_features, dtype)
    kernel_ss = synthetic @ synthetic.T
    kernel_ts = real @ synthetic.T
    m = kernel_ss.shape[0]
    regulariser = ridge * torch.trace(kernel_ss.detach())
    system = kernel_ss + regulariser * torch.eye(m, dtype=dtype, device=kernel_ss.device)
    cholesky, info = torch.linalg.cholesky_ex(system)
    weights = torch.cholesky_solve(synthetic_targets.to(dtype), cholesky)
    return kernel_ts @ weights, info


def check_cholesky(info: torch.Tensor, m: int, ridge: float, dtype: torch.dtype) -> None:
    """Raise `KrrstError` when `info` (from `torch.linalg.cholesky_ex`) reports a failed factorisation."""
    if int(info) != 0:
        raise KrrstError(
            f"kernel matrix not positive definite (m={m}, ridge={ridge}, dtype={str(dtype).removeprefix('torch.')}); "
            "increase ridge or use kernel_dtype=float64"
        )


def krr_st_loss(
    synthetic_features: torch.Tensor,
    synthetic_targets: torch.Tensor,
    real_features: torch.Tensor,
    real_targets: torch.Tensor,
    ridge: float = 1e-6,
    kernel_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The KRR-ST outer loss (a scalar, differentiable in the synthetic inputs).

    With `F_s = [f(X_s), 1]`, `F_t = [f(X_t), 1]`, `Y_s` and `G_t = g(X_t)`::

        L = mean over all n x d elements of ( F_t F_sᵀ (F_s F_sᵀ + λ I)⁻¹ Y_s − G_t )²
        λ = ridge · trace(F_s F_sᵀ)   (trace detached)

    i.e. `F.mse_loss(krr_predict(...), G_t)`. The bias column is appended here;
    pass the raw features. See `krr_predict` for dtypes and errors.
    """
    loss, info = krr_st_loss_with_info(synthetic_features, synthetic_targets, real_features, real_targets, ridge,
                                       kernel_dtype)
    check_cholesky(info, synthetic_features.shape[0], ridge, torch.promote_types(synthetic_features.dtype, kernel_dtype))
    return loss


def krr_st_loss_with_info(
    synthetic_features: torch.Tensor,
    synthetic_targets: torch.Tensor,
    real_features: torch.Tensor,
    real_targets: torch.Tensor,
    ridge: float = 1e-6,
    kernel_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`krr_st_loss` without the check: `(loss, info)`, info != 0 where Cholesky failed (see `krr_predict_with_info`).

    The outer loop's form: it keeps `info` on the device and reads it only when it logs or saves.
    """
    predictions, info = krr_predict_with_info(synthetic_features, synthetic_targets, real_features, ridge, kernel_dtype)
    return F.mse_loss(predictions, real_targets.to(predictions.dtype)), info


def barlow_twins_loss(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    lambda_offdiag: float = 0.0051,
    scale: float = 1.0,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Barlow Twins loss of two N x D embeddings of the same N images (Zbontar et al., ICML 2021).

    Each dimension is standardised over the batch (as `BatchNorm1d(affine=False)`
    in training mode: biased variance, `eps` inside the square root), then

        c = z_a_stdᵀ z_b_std / N                      (D x D cross-correlation)
        loss = scale * [ Σ_i (1 − c_ii)² + λ Σ_{i≠j} c_ij² ]

    The first term makes the two views agree dimension by dimension, the second
    decorrelates the dimensions. λ = 0.0051 is the paper's value.

    >>> z = torch.randn(8, 4)
    >>> float(barlow_twins_loss(z, z, lambda_offdiag=0.0)) < 1e-3   # identical views: diagonal is 1
    True
    """
    if z_a.shape != z_b.shape or z_a.dim() != 2:
        raise ValueError(
            f"barlow_twins_loss needs two N x D embeddings of one shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}"
        )
    n = z_a.shape[0]

    def standardise(z: torch.Tensor) -> torch.Tensor:
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)

    c = standardise(z_a).T @ standardise(z_b) / n
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return scale * (on_diag + lambda_offdiag * off_diag)


def simclr_loss(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """NT-Xent, the SimCLR loss (Chen et al., ICML 2020), of two N x D embeddings.

    With u = the 2N L2-normalised embeddings (views a then b) and
    s_ij = u_i·u_j / temperature, each embedding's positive is the other view
    of its image and its negatives are the 2N − 2 other embeddings:

        loss = mean over the 2N anchors i of  −log( exp(s_i,pos(i)) / Σ_{j≠i} exp(s_ij) )

    >>> z = torch.randn(8, 4)
    >>> simclr_loss(z, z).shape
    torch.Size([])
    """
    if z_a.shape != z_b.shape or z_a.dim() != 2:
        raise ValueError(
            f"simclr_loss needs two N x D embeddings of one shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}"
        )
    n = z_a.shape[0]
    u = F.normalize(torch.cat([z_a, z_b]), dim=1)
    logits = u @ u.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=u.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(u.device)
    return F.cross_entropy(logits, positives)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Soft cross-entropy of the student against the teacher's softened distribution, mean over the batch.

    L = -(T^2 / B) * sum_b sum_k softmax(t_b / T)_k * log softmax(s_b / T)_k

    with teacher logits t, student logits s, batch size B and temperature T.
    The T^2 factor (Hinton et al. 2015) keeps gradient magnitudes comparable
    across temperatures; at the paper's T = 1 this is exactly the authors'
    `distillation_loss`. The teacher side carries no gradient.
    """
    if temperature <= 0:
        raise KrrstError(f"KD temperature must be > 0, got {temperature!r}")
    teacher_probabilities = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    student_log_probabilities = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_example = -(teacher_probabilities * student_log_probabilities).sum(dim=-1)
    return per_example.mean() * temperature**2


def parameter_matching_loss(
    final_params: torch.Tensor, start_params: torch.Tensor, target_params: torch.Tensor
) -> torch.Tensor:
    """MTT's normalised parameter distance (Cazenavette et al., CVPR 2022, Eq. 2), as MKDT matches trajectories.

    With θ_N the flat parameters after N unrolled student steps from an
    expert's θ_t, and θ_{t+M} the expert's parameters M epochs later::

        loss = ||θ_N − θ_{t+M}||² / ||θ_t − θ_{t+M}||²

    Differentiable in `final_params`; the expert's two points carry no gradient.
    """
    start, target = start_params.detach(), target_params.detach()
    return (final_params - target).pow(2).sum() / (start - target).pow(2).sum()
