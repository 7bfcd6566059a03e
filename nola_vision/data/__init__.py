"""Few-shot data: datasets by name, seeded k-shot splits with manifests, transforms, a Lightning DataModule."""

from .datamodule import FewShotDataModule, FewShotSubset
from .datasets import (
    DATASETS,
    CorruptImageError,
    DatasetMetadataError,
    DatasetNotFoundError,
    ImageDataset,
    available_datasets,
    build_dataset,
    dataset_class_names,
    dataset_num_classes,
    download_dataset,
)
from .fewshot import (
    FewShotSplit,
    NotEnoughImagesError,
    indices_from_manifest,
    read_manifest,
    sample_kshot,
    write_manifest,
)
from .transforms import DataConfig, build_transforms, resolve_data_config

__all__ = [
    "DATASETS",
    "CorruptImageError",
    "DataConfig",
    "DatasetMetadataError",
    "DatasetNotFoundError",
    "FewShotDataModule",
    "FewShotSplit",
    "FewShotSubset",
    "ImageDataset",
    "NotEnoughImagesError",
    "available_datasets",
    "build_dataset",
    "build_transforms",
    "dataset_class_names",
    "dataset_num_classes",
    "download_dataset",
    "indices_from_manifest",
    "read_manifest",
    "resolve_data_config",
    "sample_kshot",
    "write_manifest",
]
