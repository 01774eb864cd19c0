"""Tests of krrst.parameterize: exact storage counts, PCA, finite-difference gradients, lr semantics, the predictor."""

import math

import pytest
import torch
import torch.nn.functional as F

from krrst.augment import fixed_augment_all
from krrst.infra import io
from krrst.infra.errors import KrrstError
from krrst.parameterize import (
    AugmentationPredictor,
    BasisSet,
    PixelSet,
    PyramidSet,
    augmentation_predictor_loss,
    basis_images_for_budget,
    make_synthetic_set,
    pixel_storage_bytes,
    pyramid_images_for_budget,
)

STD = (0.2470, 0.2435, 0.2616)


def initial_set(m=6, shape=(3, 4, 4), d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, *shape, generator=g, dtype=dtype), torch.randn(m, d, generator=g, dtype=dtype)


def central_difference(scalar, leaf: torch.Tensor, entry, eps: float = 1e-6) -> float:
    """(f(x + eps e) - f(x - eps e)) / 2 eps for one entry of `leaf`, which is left as it was."""
    with torch.no_grad():
        leaf[entry] += eps
        plus = scalar().item()
        leaf[entry] -= 2 * eps
        minus = scalar().item()
        leaf[entry] += eps
    return (plus - minus) / (2 * eps)


# --------------------------------------------------------------------------- pixel set


def test_pixel_set_starts_at_initial_values_and_does_not_alias_them():
    images, targets = initial_set()
    synthetic = PixelSet(images, targets)
    assert synthetic.kind == "pixels" and synthetic.num_images == 6
    assert torch.equal(synthetic.images(), images) and torch.equal(synthetic.targets(), targets)
    with torch.no_grad():
        synthetic.image_channels[0].add_(1.0)
    assert not torch.equal(synthetic.images(), images)  # the caller's tensor is untouched
    assert all(p.is_leaf and p.requires_grad for p in synthetic.parameters())


def test_pixel_param_groups_give_per_channel_lr():
    images, targets = initial_set()
    synthetic = PixelSet(images, targets)
    groups = synthetic.param_groups(1e-4, 3e-4, STD)
    assert [g["lr"] for g in groups] == pytest.approx([1e-4 / s for s in STD] + [3e-4])
    for c in range(3):
        assert torch.equal(groups[c]["params"][0], images[:, c : c + 1])
    assert groups[3]["params"][0] is synthetic.targets()
    # one Adam step moves channel c's pixels by exactly image_lr / std_c (up to eps): the raw-pixel semantics
    optimizer = torch.optim.Adam(groups, eps=1e-30)
    (synthetic.images().sin().sum() + synthetic.targets().sum()).backward()
    optimizer.step()
    moved = (synthetic.images().detach() - images).abs()
    for c in range(3):
        torch.testing.assert_close(moved[:, c], torch.full_like(moved[:, c], 1e-4 / STD[c]))
    with pytest.raises(KrrstError, match="std must hold 3"):
        synthetic.param_groups(1e-4, 1e-4, (0.5, 0.5))


def test_pixel_storage_is_one_value_per_pixel_and_target_entry():
    synthetic = PixelSet(*initial_set(m=6, shape=(3, 4, 4), d=5))
    assert synthetic.storage_bytes() == (6 * 48 + 6 * 5) * 4 == pixel_storage_bytes(6, (3, 4, 4), 5)
    assert synthetic.storage_bytes(bytes_per_value=2) == (6 * 48 + 6 * 5) * 2
    assert synthetic.summary() == {"kind": "pixels", "num_images": 6, "storage_bytes": 1272}


def test_pixel_state_dict_round_trip_through_safetensors(tmp_path):
    source = PixelSet(*initial_set(seed=0))
    other = PixelSet(*initial_set(seed=1))
    leaves = other.parameters()
    io.save_state(tmp_path / "state.safetensors", {"synthetic": source.state_dict()})
    other.load_state_dict(io.load_state(tmp_path / "state.safetensors")["synthetic"])
    assert torch.equal(other.images(), source.images()) and torch.equal(other.targets(), source.targets())
    assert all(a is b for a, b in zip(other.parameters(), leaves))  # loaded in place
    with pytest.raises(KrrstError, match="keys"):
        other.load_state_dict({"images": source.images().detach()})
    with pytest.raises(KrrstError, match="shape"):
        PixelSet(*initial_set(m=4)).load_state_dict(source.state_dict())


# --------------------------------------------------------------------------- basis set


def test_basis_pca_init_is_exact_at_full_rank():
    images, targets = initial_set(m=6, d=5)
    synthetic = BasisSet(images, targets, image_rank=6, target_rank=5)
    torch.testing.assert_close(synthetic.images(), images, rtol=0, atol=1e-12)
    torch.testing.assert_close(synthetic.targets(), targets, rtol=0, atol=1e-12)
    assert synthetic.images().shape == images.shape
    basis = synthetic.leaves["image_basis"].detach()
    torch.testing.assert_close(basis @ basis.T, torch.eye(6, dtype=basis.dtype))  # orthonormal rows


def test_basis_pca_init_is_the_best_rank_k_fit():
    images, targets = initial_set(m=10, d=5)
    k = 3
    synthetic = BasisSet(images, targets, image_rank=k, target_rank=2)
    rows = images.reshape(10, -1)
    centred = rows - rows.mean(0)
    singular = torch.linalg.svdvals(centred)
    error = (synthetic.images().detach().reshape(10, -1) - rows).pow(2).sum()
    # Eckart-Young: the residual is the energy in the trailing singular values
    torch.testing.assert_close(error, singular[k:].pow(2).sum())
    # and no other rank-k basis through the mean does better (a random one, projected optimally)
    q = torch.linalg.qr(torch.randn(48, k, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))[0]
    assert (centred - centred @ q @ q.T).pow(2).sum() > error


def test_project_targets_keeps_what_each_set_can_store():
    images, targets = initial_set(m=10, d=6)
    other = torch.randn(10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert torch.equal(PixelSet(images, targets).project_targets(other), other)
    k = 2
    projected = BasisSet(images, targets, image_rank=3, target_rank=k).project_targets(other)
    # the best rank-k affine fit of the new targets (not of the set's own): Eckart-Young residual
    centred = other - other.mean(0)
    error = (projected - other).pow(2).sum()
    torch.testing.assert_close(error, torch.linalg.svdvals(centred)[k:].pow(2).sum())
    assert torch.linalg.matrix_rank(projected - projected.mean(0), rtol=1e-9) == k
    full = BasisSet(images, targets, image_rank=3, target_rank=6).project_targets(other)
    torch.testing.assert_close(full, other, rtol=0, atol=1e-12)
    with pytest.raises(KrrstError, match=r"project_targets: expected targets of shape \(10, 6\), got \(10, 5\)"):
        BasisSet(images, targets, image_rank=3, target_rank=k).project_targets(other[:, :5])


def test_basis_storage_by_hand_and_summary():
    synthetic = BasisSet(*initial_set(m=6, shape=(3, 4, 4), d=5), image_rank=2, target_rank=3)
    # coefficients 6x2, basis 2x48, mean 48; target coefficients 6x3, basis 3x5, mean 5
    values = 12 + 96 + 48 + 18 + 15 + 5
    assert synthetic.storage_bytes() == values * 4 and synthetic.storage_bytes(2) == values * 2
    assert synthetic.summary() == {
        "kind": "basis", "num_images": 6, "image_rank": 2, "target_rank": 3, "storage_bytes": values * 4
    }


def test_gradients_reach_coefficients_and_bases_finite_differences():
    images, targets = initial_set(m=5, shape=(2, 3, 3), d=4)
    synthetic = BasisSet(images, targets, image_rank=3, target_rank=2)
    weights = torch.randn(5, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))

    def scalar() -> torch.Tensor:
        return (synthetic.images().sin() * weights).sum() + synthetic.targets().pow(3).sum()

    grads = dict(zip(synthetic.leaves, torch.autograd.grad(scalar(), synthetic.parameters())))
    checked = [("image_coefficients", (2, 1)), ("image_basis", (1, 7)), ("image_mean", (5,)),
               ("target_coefficients", (4, 0)), ("target_basis", (1, 3)), ("target_mean", (2,))]
    for name, index in checked:
        numeric = central_difference(scalar, synthetic.leaves[name], index)
        assert grads[name][index].item() == pytest.approx(numeric, rel=1e-6, abs=1e-8), name
        assert grads[name][index].item() != 0


def test_basis_learning_rates_move_pixels_like_the_pixel_set():
    images, targets = initial_set(m=20, shape=(3, 8, 8), d=16, dtype=torch.float32)
    synthetic = BasisSet(images, targets, image_rank=8, target_rank=4)
    groups = synthetic.param_groups(1e-3, 2e-3, STD)
    pixel_step = 1e-3 * math.sqrt(sum(1 / s**2 for s in STD) / 3)
    coefficient_norm = synthetic.leaves["image_coefficients"].detach().pow(2).sum(1).mean().sqrt().item()
    expected = [pixel_step * math.sqrt(192 / 8), pixel_step / coefficient_norm, pixel_step]
    assert [g["lr"] for g in groups[:3]] == pytest.approx(expected)
    assert groups[5]["lr"] == pytest.approx(2e-3)
    weights = torch.randn(20, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def rms_move(group_index: int) -> float:
        """RMS change of the materialised pixels after one Adam step of that group alone."""
        probe = BasisSet(images, targets, image_rank=8, target_rank=4)
        optimizer = torch.optim.Adam([probe.param_groups(1e-3, 2e-3, STD)[group_index]], eps=1e-30)
        (probe.images() * weights).sum().backward()
        optimizer.step()
        return (probe.images().detach() - synthetic.images().detach()).pow(2).mean().sqrt().item()

    # exact at the PCA start: orthonormal basis rows (coefficients), orthogonal coefficient columns (basis)
    for group_index in range(3):
        assert rms_move(group_index) == pytest.approx(pixel_step, rel=1e-4)


def test_basis_state_dict_round_trip_through_safetensors(tmp_path):
    source = BasisSet(*initial_set(seed=0), image_rank=3, target_rank=2)
    with torch.no_grad():
        source.leaves["image_basis"].mul_(1.5)  # a trained state differs from any PCA init
    other = BasisSet(*initial_set(seed=1), image_rank=3, target_rank=2)
    io.save_state(tmp_path / "state.safetensors", {"synthetic": source.state_dict()})
    other.load_state_dict(io.load_state(tmp_path / "state.safetensors")["synthetic"])
    assert torch.equal(other.images(), source.images()) and torch.equal(other.targets(), source.targets())
    assert [g["lr"] for g in other.param_groups(1e-4, 1e-4, STD)] == [
        g["lr"] for g in source.param_groups(1e-4, 1e-4, STD)
    ]
    with pytest.raises(KrrstError, match="shape"):
        BasisSet(*initial_set(seed=0), image_rank=2, target_rank=2).load_state_dict(source.state_dict())
    with pytest.raises(KrrstError, match="keys"):
        other.load_state_dict(PixelSet(*initial_set()).state_dict())


def test_basis_images_for_budget_by_hand():
    # D = 48, d = 5, k = 2, k_t = 1: shared 2*48 + 48 + 1*5 + 5 = 154 values, 3 per image
    budget = pixel_storage_bytes(10, (3, 4, 4), 5)  # (480 + 50) * 4 = 2120 bytes = 530 values
    assert budget == 2120
    m = basis_images_for_budget(budget, (3, 4, 4), 5, image_rank=2, target_rank=1)
    assert m == (530 - 154) // 3 == 125
    fits = BasisSet(*initial_set(m=m), image_rank=2, target_rank=1)
    assert fits.storage_bytes() <= budget < BasisSet(*initial_set(m=m + 1), image_rank=2, target_rank=1).storage_bytes()
    assert basis_images_for_budget(budget, (3, 4, 4), 5, 2, 1, bytes_per_value=2) == (1060 - 154) // 3
    with pytest.raises(KrrstError, match="lower them"):
        basis_images_for_budget(pixel_storage_bytes(1, (3, 4, 4), 5), (3, 4, 4), 5, 2, 1)


def test_factory_and_rank_validation():
    images, targets = initial_set(m=6, d=5)
    assert isinstance(make_synthetic_set("pixels", images, targets), PixelSet)
    basis = make_synthetic_set("basis", images, targets, image_rank=4, target_rank=5)
    assert isinstance(basis, BasisSet) and (basis.image_rank, basis.target_rank) == (4, 5)
    with pytest.raises(KrrstError, match="unknown synthetic set kind 'wavelet'"):
        make_synthetic_set("wavelet", images, targets)
    with pytest.raises(KrrstError, match="takes options"):
        make_synthetic_set("pixels", images, targets, image_rank=2)
    with pytest.raises(KrrstError, match="takes options"):
        make_synthetic_set("basis", images, targets, image_rank=2)
    with pytest.raises(KrrstError, match="image_rank"):
        make_synthetic_set("basis", images, targets, image_rank=7, target_rank=2)  # > m
    with pytest.raises(KrrstError, match="target_rank"):
        make_synthetic_set("basis", images, targets, image_rank=2, target_rank=6)  # > d
    with pytest.raises(KrrstError, match="image_rank"):
        make_synthetic_set("basis", images, targets, image_rank=0, target_rank=2)
    with pytest.raises(KrrstError, match="initial targets"):
        make_synthetic_set("pixels", images, targets[:3])


# --------------------------------------------------------------------------- pyramid set


def _up(level, side):
    return F.interpolate(level, size=(side, side), mode="bilinear", align_corners=False)


def test_pyramid_start_is_exact_when_the_finest_level_is_full_resolution():
    images, targets = initial_set(m=6, shape=(3, 8, 8), d=5)
    synthetic = PyramidSet(images, targets, levels=(2, 3, 8))
    assert synthetic.kind == "pyramid" and synthetic.num_images == 6 and synthetic.levels == (2, 3, 8)
    assert [tuple(synthetic.level(i).shape) for i in range(3)] == [(6, 3, 2, 2), (6, 3, 3, 3), (6, 3, 8, 8)]
    torch.testing.assert_close(synthetic.images(), images, rtol=0, atol=1e-12)
    assert torch.equal(synthetic.targets(), targets)
    # the coarsest level is the plain block mean of the image (area downsampling), 4 x 4 blocks at side 2
    torch.testing.assert_close(synthetic.level(0).detach(), images.reshape(6, 3, 2, 4, 2, 4).mean((3, 5)))
    with torch.no_grad():
        synthetic.level_channels[0][0].add_(1.0)
    assert not torch.equal(synthetic.images(), images)
    assert torch.equal(initial_set(m=6, shape=(3, 8, 8), d=5)[0], images)  # the caller's tensor is untouched
    assert all(p.is_leaf and p.requires_grad for p in synthetic.parameters())


def test_pyramid_start_below_full_resolution_is_the_upsampled_area_downsampling():
    images, targets = initial_set(m=4, shape=(3, 8, 8), d=5)
    single = PyramidSet(images, targets, levels=(4,))
    expected = _up(F.interpolate(images, size=(4, 4), mode="area"), 8)
    torch.testing.assert_close(single.images(), expected, rtol=0, atol=1e-12)
    # coarse to fine: the next level is the area downsampling of what the coarser one leaves unexplained
    coarse = F.interpolate(images, size=(2, 2), mode="area")
    fine = F.interpolate(images - _up(coarse, 8), size=(4, 4), mode="area")
    two = PyramidSet(images, targets, levels=(2, 4))
    torch.testing.assert_close(two.level(0).detach(), coarse, rtol=0, atol=1e-12)
    torch.testing.assert_close(two.level(1).detach(), fine, rtol=0, atol=1e-12)
    torch.testing.assert_close(two.images(), _up(coarse, 8) + _up(fine, 8), rtol=0, atol=1e-12)
    # a low-resolution approximation: closer to the images than their mean, and not exact
    error = (single.images().detach() - images).pow(2).sum()
    assert 0 < error < (images - images.mean((2, 3), keepdim=True)).pow(2).sum()


def test_pyramid_with_one_full_resolution_level_is_the_pixel_set():
    images, targets = initial_set(m=5, shape=(3, 4, 4), d=3)
    pyramid, pixels = PyramidSet(images, targets, levels=(4,)), PixelSet(images, targets)
    assert [g["lr"] for g in pyramid.param_groups(1e-3, 2e-3, STD)] == [
        g["lr"] for g in pixels.param_groups(1e-3, 2e-3, STD)
    ]
    optimizers = [torch.optim.Adam(s.param_groups(1e-3, 2e-3, STD)) for s in (pyramid, pixels)]
    weights = torch.randn(5, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        for synthetic, optimizer in zip((pyramid, pixels), optimizers):
            optimizer.zero_grad()
            ((synthetic.images() * weights).sin().sum() + synthetic.targets().pow(2).sum()).backward()
            optimizer.step()
    assert torch.equal(pyramid.images(), pixels.images()) and torch.equal(pyramid.targets(), pixels.targets())


def test_pyramid_learning_rates_move_pixels_like_the_pixel_set():
    images, targets = initial_set(m=4, shape=(3, 8, 8), d=5)
    levels = (2, 3, 8)
    groups = PyramidSet(images, targets, levels).param_groups(1e-3, 2e-3, STD)
    assert [g["lr"] for g in groups] == pytest.approx([1e-3 / (s * 3) for s in STD] * 3 + [2e-3])

    def moved(weights: torch.Tensor) -> torch.Tensor:
        """|change| of the materialised pixels after one Adam step on sum(images * weights)."""
        probe = PyramidSet(images, targets, levels)
        optimizer = torch.optim.Adam(probe.param_groups(1e-3, 2e-3, STD), eps=1e-30)
        (probe.images() * weights).sum().backward()
        optimizer.step()
        return (probe.images().detach() - PyramidSet(images, targets, levels).images().detach()).abs()

    pixel_step = torch.tensor([1e-3 / s for s in STD], dtype=torch.float64).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(4)
    # a gradient of one sign: every entry of every level moves its full lr the same way, every pixel by image_lr/std_c
    torch.testing.assert_close(moved(torch.rand(4, 3, 8, 8, dtype=torch.float64, generator=g) + 0.1),
                               pixel_step.expand(4, 3, 8, 8), rtol=1e-9, atol=0)
    # any gradient: no pixel moves further than the pixel set's step, and levels that disagree move it less
    rough = moved(torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=g))
    assert (rough <= pixel_step * (1 + 1e-9)).all() and (rough < 0.9 * pixel_step).any()


def test_pyramid_storage_by_hand_and_summary():
    synthetic = PyramidSet(*initial_set(m=6, shape=(3, 8, 8), d=5), levels=(2, 4))
    values = 6 * 3 * (2 * 2 + 4 * 4) + 6 * 5  # levels 6x3x2x2 and 6x3x4x4, targets 6x5
    assert values == 390
    assert synthetic.storage_bytes() == values * 4 and synthetic.storage_bytes(2) == values * 2
    assert synthetic.summary() == {"kind": "pyramid", "num_images": 6, "levels": [2, 4], "storage_bytes": 1560}


def test_pyramid_gradients_reach_every_level_finite_differences():
    images, targets = initial_set(m=3, shape=(2, 6, 6), d=4)
    synthetic = PyramidSet(images, targets, levels=(2, 4, 6))  # 4 -> 6: a non-integer scale
    weights = torch.randn(3, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))

    def scalar() -> torch.Tensor:
        return (synthetic.images().sin() * weights).sum() + synthetic.targets().pow(3).sum()

    grads = torch.autograd.grad(scalar(), synthetic.parameters())
    leaves = synthetic.parameters()
    # (leaf index, entry): both channels of each level (leaves are level-major, then channel), then the targets
    checked = [(0, (1, 0, 1, 0)), (1, (2, 0, 0, 1)), (2, (0, 0, 3, 2)), (3, (1, 0, 2, 3)), (4, (2, 0, 5, 0)),
               (5, (0, 0, 1, 4)), (6, (2, 3))]
    for index, entry in checked:
        numeric = central_difference(scalar, leaves[index], entry)
        assert grads[index][entry].item() == pytest.approx(numeric, rel=1e-6, abs=1e-8), index
        assert grads[index][entry].item() != 0


def test_pyramid_state_dict_round_trip_through_safetensors(tmp_path):
    source = PyramidSet(*initial_set(m=6, shape=(3, 8, 8), seed=0), levels=(2, 4))
    with torch.no_grad():
        source.level_channels[1][2].mul_(1.5)  # a trained state differs from any coarse-to-fine start
    other = PyramidSet(*initial_set(m=6, shape=(3, 8, 8), seed=1), levels=(2, 4))
    leaves = other.parameters()
    assert sorted(source.state_dict()) == ["level_2", "level_4", "targets"]
    io.save_state(tmp_path / "state.safetensors", {"synthetic": source.state_dict()})
    other.load_state_dict(io.load_state(tmp_path / "state.safetensors")["synthetic"])
    assert torch.equal(other.images(), source.images()) and torch.equal(other.targets(), source.targets())
    assert all(a is b for a, b in zip(other.parameters(), leaves))  # loaded in place
    with pytest.raises(KrrstError, match="keys"):
        PyramidSet(*initial_set(m=6, shape=(3, 8, 8)), levels=(2, 8)).load_state_dict(source.state_dict())
    with pytest.raises(KrrstError, match="shape"):
        PyramidSet(*initial_set(m=4, shape=(3, 8, 8)), levels=(2, 4)).load_state_dict(source.state_dict())
    with pytest.raises(KrrstError, match="keys"):
        other.load_state_dict(PixelSet(*initial_set(m=6, shape=(3, 8, 8))).state_dict())


def test_pyramid_images_for_budget_by_hand():
    # C = 3, levels (2, 4): 3 * (4 + 16) + d = 65 values per image, nothing shared
    budget = pixel_storage_bytes(10, (3, 8, 8), 5)  # (1920 + 50) * 4 = 7880 bytes = 1970 values
    assert budget == 7880
    m = pyramid_images_for_budget(budget, (3, 8, 8), 5, levels=(2, 4))
    assert m == 1970 // 65 == 30
    fits = PyramidSet(*initial_set(m=m, shape=(3, 8, 8)), levels=(2, 4))
    too_many = PyramidSet(*initial_set(m=m + 1, shape=(3, 8, 8)), levels=(2, 4))
    assert fits.storage_bytes() <= budget < too_many.storage_bytes()
    assert pyramid_images_for_budget(budget, (3, 8, 8), 5, (2, 4), bytes_per_value=2) == 3940 // 65
    with pytest.raises(KrrstError, match="holds no pyramid image at levels=.2, 4."):
        pyramid_images_for_budget(64 * 4, (3, 8, 8), 5, (2, 4))
    with pytest.raises(KrrstError, match="levels must be strictly increasing"):
        pyramid_images_for_budget(budget, (3, 8, 8), 5, (4, 2))


def test_pyramid_factory_validation_and_targets():
    images, targets = initial_set(m=6, shape=(3, 8, 8), d=5)
    pyramid = make_synthetic_set("pyramid", images, targets, levels=[4, 8])
    assert isinstance(pyramid, PyramidSet) and pyramid.levels == (4, 8)
    other = torch.randn(6, 5, dtype=torch.float64)
    assert pyramid.project_targets(other) is other  # plain targets: any m x d, as they are
    with pytest.raises(KrrstError, match=r"project_targets: expected targets of shape \(6, 5\)"):
        pyramid.project_targets(other[:, :4])
    with pytest.raises(KrrstError, match="takes options"):
        make_synthetic_set("pyramid", images, targets)
    for bad in ((), (4, 2), (2, 2), (0, 4), (4, 16), (2.0, 4), "48"):
        with pytest.raises(KrrstError, match=r"levels must be strictly increasing integers in \[1, 8\]"):
            make_synthetic_set("pyramid", images, targets, levels=bad)
    with pytest.raises(KrrstError, match="images must be square, got 8 x 6"):
        PyramidSet(images[..., :6], targets, levels=(2,))
    with pytest.raises(KrrstError, match="std must hold 3"):
        pyramid.param_groups(1e-4, 1e-4, (0.5, 0.5))


# --------------------------------------------------------------------------- augmentation predictor


def test_predictor_starts_as_identity_in_fixed_augment_all_order():
    targets = torch.randn(4, 6)
    for hidden in (None, 3):
        predictor = AugmentationPredictor(6, ("rot90", "identity", "hflip"), hidden=hidden,
                                          generator=torch.Generator().manual_seed(0))
        out = predictor(targets)
        assert out.shape == (12, 6)
        torch.testing.assert_close(out, targets.repeat(3, 1))
    images = torch.randn(4, 3, 5, 5)
    assert len(fixed_augment_all(images, predictor.names)) == len(out)


def test_predictor_storage_by_hand():
    assert AugmentationPredictor(6).storage_bytes() == 3 * (36 + 6) * 4  # rot90/180/270, identity free
    assert AugmentationPredictor(6, ("identity", "hflip"), hidden=2).storage_bytes(2) == (12 + 2 + 12 + 6) * 2
    assert AugmentationPredictor(6, ("identity",)).storage_bytes() == 0


def test_predictor_recovers_an_exact_linear_relation():
    torch.manual_seed(0)
    d, m = 4, 64
    g = torch.Generator().manual_seed(5)
    names = ("identity", "rot90", "rot180")
    maps = torch.eye(d) + 0.5 * torch.randn(2, d, d, generator=g)
    shifts = torch.randn(2, d, generator=g)
    reps = torch.randn(m, d, generator=g)
    reps_of_views = torch.cat([reps, reps @ maps[0].T + shifts[0], reps @ maps[1].T + shifts[1]])
    predictor = AugmentationPredictor(d, names)
    optimizer = torch.optim.Adam(predictor.parameters(), lr=0.05)
    initial = augmentation_predictor_loss(predictor, reps_of_views, reps).item()
    for _ in range(600):
        optimizer.zero_grad()
        loss = augmentation_predictor_loss(predictor, reps_of_views, reps)
        loss.backward()
        optimizer.step()
    assert loss.item() < 1e-6 * initial
    torch.testing.assert_close(predictor.weight.detach(), maps, atol=1e-3, rtol=0)
    torch.testing.assert_close(predictor.bias.detach(), shifts, atol=1e-3, rtol=0)
    # the loss is the mean over the non-identity views only
    perfect = predictor(reps).detach()
    noisy = perfect.clone()
    noisy[m:] += 1.0
    assert augmentation_predictor_loss(predictor, noisy, reps).item() == pytest.approx(1.0, rel=1e-3)
    with pytest.raises(KrrstError, match="3 views of 64"):
        augmentation_predictor_loss(predictor, reps_of_views[:-1], reps)


def test_mlp_predictor_fits_a_nonlinear_view():
    g = torch.Generator().manual_seed(2)
    reps = torch.randn(128, 3, generator=g)
    reps_of_views = torch.cat([reps, reps + torch.relu(reps).flip(1)])
    predictor = AugmentationPredictor(3, ("identity", "hflip"), hidden=16, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(predictor.parameters(), lr=0.02)
    initial = augmentation_predictor_loss(predictor, reps_of_views, reps).item()
    for _ in range(400):
        optimizer.zero_grad()
        loss = augmentation_predictor_loss(predictor, reps_of_views, reps)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.01 * initial
