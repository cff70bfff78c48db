"""torchvision's Python side without its C extension (the model definitions need no custom operator)."""

import importlib.util
from pathlib import Path

import torch

#: The library that holds the schemas: a ``Library`` undefines its operators when collected.
_schemas: list[torch.library.Library] = []


def define_torchvision_op_schemas() -> None:
    """Let a torchvision whose C extension cannot load (the registry's wheel links against CUDA torch) be
    imported with the CPU torch: its Python side registers fake kernels for ``nms`` and ``qnms``, which
    fails with "operator torchvision::nms does not exist" unless their schemas are defined. Lightning
    imports torchvision when it is installed, so this runs before anything imports Lightning. Nothing
    happens without torchvision, or when its extension loads (then it defines the operators itself).
    """
    spec = importlib.util.find_spec("torchvision")
    if _schemas or spec is None or spec.origin is None:
        return
    extension = next(Path(spec.origin).parent.glob("_C.*"), None)
    if extension is not None:
        try:
            torch.ops.load_library(str(extension))
            return
        except OSError:
            pass
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _schemas.append(lib)
