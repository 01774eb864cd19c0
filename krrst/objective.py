"""The KRR-ST objective: closed-form kernel ridge regression and the outer loss.

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

from krrst.errors import KrrstError


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
    predictions = krr_predict(synthetic_features, synthetic_targets, real_features, ridge, kernel_dtype)
    return F.mse_loss(predictions, real_targets.to(predictions.dtype))
