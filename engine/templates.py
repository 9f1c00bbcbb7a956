"""Prompt templates for the CoOp / CoCoOp / CLIPFit benchmark datasets.

The per-dataset template is the single hand-written prompt CoOp uses for zero-shot CLIP and that CLIPFit trains with
(``CUSTOM_TEMPLATES`` in CoOp's ``trainers/zsclip.py``). ``IMAGENET_ENSEMBLE`` is the 7-template subset of CLIP's
ImageNet prompt ensemble selected by CoOp (``IMAGENET_TEMPLATES_SELECT``).

Public API::

    canonical_dataset_name("oxford_pets")         -> "OxfordPets"   (KeyError for an unknown name)
    get_templates("OxfordPets")                    -> ["a photo of a {}, a type of pet."]
    get_templates(None)                            -> ["a photo of a {}."]
    get_templates("EuroSAT", override="a {}.")     -> ["a {}."]        (override wins)
    get_templates("ImageNet", override="ensemble") -> IMAGENET_ENSEMBLE
    format_prompts(["cat", "dog"], ["a {}.", "art of the {}."]) -> [["a cat.", "art of the cat."], [...]]
    clean_classname("Yorkshire_terrier")           -> "Yorkshire terrier"

A template is a string holding ``{}`` once or more; every ``{}`` is replaced by the class name (``str.replace``, so
other braces in a template are kept literally).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

__all__ = [
    "DEFAULT_TEMPLATE",
    "DATASET_TEMPLATES",
    "CLIPFIT_TEMPLATES",
    "TEMPLATE_SETS",
    "IMAGENET_ENSEMBLE",
    "DATASET_NAMES",
    "canonical_dataset_name",
    "get_templates",
    "format_prompts",
    "clean_classname",
    "validate_template",
]

DEFAULT_TEMPLATE = "a photo of a {}."

# CoOp's CUSTOM_TEMPLATES (keys are our canonical dataset names).
DATASET_TEMPLATES: dict[str, str] = {
    "ImageNet": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "OxfordPets": "a photo of a {}, a type of pet.",
    "StanfordCars": "a photo of a {}.",
    "Flowers102": "a photo of a {}, a type of flower.",
    "Food101": "a photo of {}, a type of food.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "SUN397": "a photo of a {}.",
    "DTD": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
    "Synthetic": "a photo of a {}.",
}

DATASET_NAMES: tuple[str, ...] = tuple(DATASET_TEMPLATES)

# CLIPFit's code (CUSTOM_TEMPLATES in its trainers/ClipFit.py) trains with CoOp's templates except for DTD.
CLIPFIT_TEMPLATES: dict[str, str] = {**DATASET_TEMPLATES, "DTD": "a photo of a {}, a type of texture."}

# Per-dataset template sets, by name: "coop" (the default) and "clipfit".
TEMPLATE_SETS: dict[str, dict[str, str]] = {"coop": DATASET_TEMPLATES, "clipfit": CLIPFIT_TEMPLATES}

# CoOp's IMAGENET_TEMPLATES_SELECT: 7 of CLIP's 80 ImageNet templates.
IMAGENET_ENSEMBLE: list[str] = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]

# Keywords accepted as `override` that name a template set rather than being a template.
_NAMED_SETS: dict[str, list[str]] = {
    "ensemble": IMAGENET_ENSEMBLE,
    "imagenetensemble": IMAGENET_ENSEMBLE,
    "imagenettemplates": IMAGENET_ENSEMBLE,
    "default": [DEFAULT_TEMPLATE],
}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


# normalized alias -> canonical name. Covers our names, CoOp's class/dir names and common short forms.
_ALIASES: dict[str, str] = {_norm(n): n for n in DATASET_TEMPLATES}
_ALIASES.update(
    {
        "imagenet1k": "ImageNet",
        "ilsvrc2012": "ImageNet",
        "caltech": "Caltech101",
        "pets": "OxfordPets",
        "oxfordiiitpet": "OxfordPets",
        "cars": "StanfordCars",
        "flowers": "Flowers102",
        "oxfordflowers": "Flowers102",
        "oxfordflowers102": "Flowers102",
        "food": "Food101",
        "aircraft": "FGVCAircraft",
        "fgvc": "FGVCAircraft",
        "sun": "SUN397",
        "describabletextures": "DTD",
        "textures": "DTD",
        "ucf": "UCF101",
        "imagenetsketch": "ImageNetSketch",
        "sketch": "ImageNetSketch",
        "imagenetadversarial": "ImageNetA",
        "imagenetrendition": "ImageNetR",
        "imagenetv2matchedfrequency": "ImageNetV2",
    }
)


def canonical_dataset_name(name: str) -> str:
    """Map any accepted spelling ("oxford_pets", "DescribableTextures", "imagenet-a", ...) to the canonical name.

    Raises KeyError naming the dataset and listing the known ones when the name is unknown.
    """
    if not isinstance(name, str):
        raise TypeError(f"dataset must be a str, got {type(name).__name__}")
    key = _norm(name)
    if key not in _ALIASES:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
    return _ALIASES[key]


def validate_template(template: str) -> str:
    """Return `template` unchanged, or raise (TypeError: not a str; ValueError: no "{}" placeholder)."""
    if not isinstance(template, str):
        raise TypeError(f"template must be a str, got {type(template).__name__}: {template!r}")
    if "{}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' placeholder for the class name")
    return template


def get_templates(
    dataset: str | None = None,
    override: Sequence[str] | str | None = None,
    *,
    strict: bool = False,
    template_set: str = "coop",
) -> list[str]:
    """Templates for `dataset`.

    - `override` wins when given: a template string, a list of template strings, or a named set ("ensemble" =
      IMAGENET_ENSEMBLE, "default"). Every template must hold "{}" (ValueError otherwise); an empty list is an error.
    - else the dataset's single template of `template_set` ("coop": CoOp's, "clipfit": CLIPFit's code, which differs
      on DTD only); an unknown dataset (or None) gets DEFAULT_TEMPLATE, or a KeyError when `strict=True`.
    Returns a new list.
    """
    if template_set not in TEMPLATE_SETS:
        raise ValueError(f"template_set must be one of {', '.join(TEMPLATE_SETS)}, got {template_set!r}")
    if override is not None:
        if isinstance(override, str):
            named = _NAMED_SETS.get(_norm(override)) if "{}" not in override else None
            templates = list(named) if named is not None else [override]
        elif isinstance(override, Iterable):
            templates = list(override)
        else:
            raise TypeError(f"override must be a str or a list of str, got {type(override).__name__}")
        if not templates:
            raise ValueError("override is an empty template list")
        return [validate_template(t) for t in templates]
    if dataset is None:
        return [DEFAULT_TEMPLATE]
    try:
        name = canonical_dataset_name(dataset)
    except KeyError:
        if strict:
            raise
        return [DEFAULT_TEMPLATE]
    return [TEMPLATE_SETS[template_set][name]]


def clean_classname(name: str) -> str:
    """Class-folder / label name -> text: underscores to spaces, whitespace collapsed, stripped (case kept)."""
    return " ".join(str(name).replace("_", " ").split())


def format_prompts(
    classnames: Sequence[str],
    templates: Sequence[str] | str,
    *,
    clean: bool = True,
) -> list[list[str]]:
    """prompts[c][t] = templates[t] with "{}" -> classnames[c] (cleaned with clean_classname unless clean=False)."""
    if isinstance(templates, str):
        templates = [templates]
    templates = [validate_template(t) for t in templates]
    if not templates:
        raise ValueError("templates is empty")
    if isinstance(classnames, str):
        raise TypeError("classnames must be a sequence of str, not a single str")
    out = []
    for c in classnames:
        name = clean_classname(c) if clean else str(c)
        out.append([t.replace("{}", name) for t in templates])
    return out
