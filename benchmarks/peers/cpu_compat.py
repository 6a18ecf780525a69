"""Make code written for CUDA and for torchvision's download-on-demand weights run unchanged on a CPU-only,
offline machine. Imported by the peer runners in this folder (never by vidshift).

- ``Tensor.cuda`` / ``Module.cuda`` return the object itself (on the CPU); ``torch.cuda.<Type>Tensor`` are the CPU
  types; ``torch.cuda.device_count()`` says 1, so code that divides batches by the GPU count (TA3N pads batches to
  a multiple of it) runs as on one GPU. ``torch.cuda.is_available()`` stays False, so DataParallel and the
  DataLoader's ``pin_memory`` behave as torch does on a CPU machine.
- ``from torch.nn.init import *`` gives ``torch`` again, as it did before torch.nn.init had an ``__all__`` (TA3N's
  models.py uses ``torch`` from that import alone).
- torchvision's ResNet builders get their weights from a local state dict (``weights_file``), or none at all, instead
  of downloading ImageNet weights.
"""
from __future__ import annotations

import torch

CPU_TENSOR_TYPES = ("FloatTensor", "DoubleTensor", "HalfTensor", "LongTensor", "IntTensor", "ShortTensor",
                    "ByteTensor", "CharTensor", "BoolTensor")
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def patch_cuda() -> None:
    def tensor_cuda(self, *args, **kwargs):
        return self

    def module_cuda(self, *args, **kwargs):
        return self

    torch.Tensor.cuda = tensor_cuda
    torch.nn.Module.cuda = module_cuda
    torch.cuda.device_count = lambda: 1
    for name in CPU_TENSOR_TYPES:
        setattr(torch.cuda, name, getattr(torch, name))


def patch_star_imports() -> None:
    import torch.nn.init as init
    if "torch" not in init.__all__:
        init.__all__ = [*init.__all__, "torch"]


def patch_torchvision_weights(weights_file: str | None) -> None:
    """Every torchvision ResNet builder (``models.resnet50(...)``, ``models.get_model("resnet50", ...)``) returns a
    model with ``weights_file``'s state dict (strict), or a random init when it is None, whatever weights the caller
    asked for."""
    import torchvision.models as models

    state = torch.load(weights_file, map_location="cpu", weights_only=True) if weights_file else None
    originals = {name: getattr(models, name) for name in RESNETS}

    def build(name: str):
        model = originals[name](weights=None)
        if state is not None:
            model.load_state_dict(state)
        return model

    for name in RESNETS:
        setattr(models, name, lambda *args, _name=name, **kwargs: build(_name))
    get_model = models.get_model

    def patched_get_model(name: str, **kwargs):
        return build(name) if name in RESNETS else get_model(name, **kwargs)

    models.get_model = patched_get_model
