"""krrst: self-supervised dataset distillation (KRR-ST, ICLR 2024) as a library and a CLI.

The stages are plain functions over plain objects:
`krrst.data.load_images` -> `krrst.teacher.train_teacher` -> `krrst.distill.distill`
-> `krrst.evaluate.pretrain` / `finetune`. See docs/design.md for the module map.
"""

from krrst.infra.errors import KrrstError

__version__ = "0.1.0"
__all__ = ["DistilledSet", "KrrstError", "__version__"]


def __getattr__(name: str):
    # DistilledSet imports torch: loaded on first use, so `krrst --help` and `krrst --version` start without it.
    if name == "DistilledSet":
        from krrst.distilled import DistilledSet

        return DistilledSet
    raise AttributeError(f"module 'krrst' has no attribute {name!r}")
