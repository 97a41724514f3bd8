"""Built-in datasets (Fashion-MNIST, digits stand-in) and image-range conversions."""

from cascade_sd.data.datasets import (
    DEFAULT_FASHION_ROOT,
    DIGIT_CLASSES,
    FASHION_CLASSES,
    SOURCES,
    SPLITS,
    DigitsStandInWarning,
    ImageSet,
    dataset_fingerprint,
    load_images,
    read_idx,
    to_model_range,
    to_uint8,
)

__all__ = [
    "DEFAULT_FASHION_ROOT",
    "DIGIT_CLASSES",
    "FASHION_CLASSES",
    "SOURCES",
    "SPLITS",
    "DigitsStandInWarning",
    "ImageSet",
    "dataset_fingerprint",
    "load_images",
    "read_idx",
    "to_model_range",
    "to_uint8",
]
