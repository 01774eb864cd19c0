"""The research scripts under scripts/ that compute something a results table relies on."""

import dataclasses
import importlib.util
from pathlib import Path

import torch

from krrst.data import ImageSet
from krrst.distill import DistillConfig, distill
from krrst.models import create_model

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_relabelling_a_learned_set_gives_what_final_targets_teacher_gives():
    """The script's re-labelled set is the set `distill.final_targets=teacher` hands out for the same run."""
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    source = ImageSet(images, None, [], MEAN, STD, "noise")
    config = DistillConfig(num_images=8, image_size=16, widths=(4, 8, 8), steps=3, batch_size=16, pool_size=2,
                           pool_steps=2, validate_every=0, target_lr=0.1)

    def teacher():
        torch.manual_seed(1)
        return create_model("convnet3", widths=(4, 4, 4), image_size=16)

    learned = distill(source, teacher(), config, progress=False)
    expected = distill(source, teacher(), dataclasses.replace(config, final_targets="teacher"), progress=False)
    relabelled = _script("relabel_with_teacher").relabel(learned, teacher())
    assert torch.equal(relabelled.images, learned.images)
    assert not torch.allclose(learned.targets, expected.targets, atol=1e-3), "the learned targets had drifted"
    # the same features of the same images, computed on the same CPU in one batch: equal up to float rounding
    torch.testing.assert_close(relabelled.targets, expected.targets, rtol=1e-5, atol=1e-6)
