"""The records every reader returns (``Sample``), the dataset registry (``DATASET_INFO``: CoOp folder
and file names per dataset) and the constants shared by the data modules."""
from __future__ import annotations

from dataclasses import dataclass

from leanclip.templates import canonical_dataset_name


IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SPLITS = ("train", "val", "test")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip OPENAI_DATASET_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # open_clip OPENAI_DATASET_STD
MAX_REPORTED = 5  # how many missing images an error message lists


@dataclass(frozen=True, slots=True)
class Sample:
    """One image: `path` (as found / joined on disk), integer `label`, text `classname`."""

    path: str
    label: int
    classname: str


# ----------------------------------------------------------------------------------------------------------------------
# Dataset registry (CoOp folder names)


@dataclass(frozen=True)
class DatasetInfo:
    dataset_dir: str  # folder under the data root, as in CoOp
    image_dir: str  # image folder inside dataset_dir ("" = dataset_dir itself)
    split_name: str | None  # <Name> of split_zhou_<Name>.json; None = read from folders


DATASET_INFO: dict[str, DatasetInfo] = {
    "Caltech101": DatasetInfo("caltech-101", "101_ObjectCategories", "Caltech101"),
    "OxfordPets": DatasetInfo("oxford_pets", "images", "OxfordPets"),
    "StanfordCars": DatasetInfo("stanford_cars", "", "StanfordCars"),
    "Flowers102": DatasetInfo("oxford_flowers", "jpg", "OxfordFlowers"),
    "Food101": DatasetInfo("food-101", "images", "Food101"),
    "SUN397": DatasetInfo("sun397", "SUN397", "SUN397"),
    "DTD": DatasetInfo("dtd", "images", "DescribableTextures"),
    "EuroSAT": DatasetInfo("eurosat", "2750", "EuroSAT"),
    "UCF101": DatasetInfo("ucf101", "UCF-101-midframes", "UCF101"),
    "Synthetic": DatasetInfo("synthetic", "images", "Synthetic"),
    "FGVCAircraft": DatasetInfo("fgvc_aircraft", "images", None),
    "ImageNet": DatasetInfo("imagenet", "images", None),
    "ImageNetSketch": DatasetInfo("imagenet-sketch", "images", None),
    "ImageNetA": DatasetInfo("imagenet-adversarial", "imagenet-a", None),
    "ImageNetR": DatasetInfo("imagenet-rendition", "imagenet-r", None),
    "ImageNetV2": DatasetInfo("imagenetv2", "imagenetv2-matched-frequency-format-val", None),
}


def canonical_or_none(dataset: str) -> str | None:
    try:
        return canonical_dataset_name(dataset)
    except KeyError:
        return None
