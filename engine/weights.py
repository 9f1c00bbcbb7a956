"""Full pretrained open_clip weights: where they come from (tags, hub ids, folders, files) and how they are read.

What open_clip users type works here too, resolved by open_clip's own code and the Hugging Face cache:

    load_pretrained(model, "laion2b_s34b_b79k", model_name="ViT-B-32")   # a pretrained tag of the config
    load_pretrained(model, "openai", model_name="ViT-B-32")              # OpenAI weights, safetensors from the hub
    load_pretrained(model, "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    load_pretrained(model, "path/to/hub_folder")     # holding open_clip_model.safetensors / open_clip_pytorch_model.bin
    load_pretrained(model, "path/to/weights.safetensors")
    model = create_model("local-dir:path/to/folder")  # config + weights from a folder, as open_clip reads it
    model = create_model("hf-hub:org/repo")           # config + weights from the hub

Tags go through ``open_clip.pretrained.get_pretrained_cfg`` / ``download_pretrained``, hub ids through
``download_pretrained_from_hf`` (``huggingface_hub.hf_hub_download``): downloaded once with network, then read from
the Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``; ``HF_HUB_OFFLINE=1`` never touches the network).

No file may run code. open_clip only *finds* the file; leanclip reads it itself: safetensors, or
``torch.load(weights_only=True)``. OpenAI's original TorchScript ``.pt`` archives execute code stored in the archive
when loaded, so they are refused unless the caller trusts the file (``trust_torchscript=True``,
``--trust-torchscript``), with a warning. The ``openai`` tag gives the same weights as safetensors.

The state dict is brought to the model's layout with open_clip's own helpers, in the order of
``open_clip.factory.load_checkpoint`` (third-party conversions, old text layout, ``logit_scale`` shape, the visual
positional embedding resized to the model's grid so ``--image-size`` works with weights made at another size), then
every key and shape is checked before anything is copied (modules a PEFT method added are not expected in the file).
"""
from __future__ import annotations

import json
import math
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from leanclip import utils
from leanclip.configs import create_random_model
from leanclip.models.openclip import (  # open_clip's loading internals, behind the one boundary module
    HF_CONFIG_NAME, QuickGELU, convert_state_dict, convert_to_custom_text_state_dict, download_pretrained_from_hf,
    find_checkpoint_in_dir, get_model_preprocess_cfg, is_pretrained_cfg, list_pretrained_tags_by_model,
    merge_preprocess_dict, resize_pos_embed, resize_text_pos_embed, set_model_preprocess_cfg,
)
from leanclip.models.openclip import pretrained_tables as P

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
_OPENAI_KEYS = ("input_resolution", "context_length", "vocab_size")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz")


class WeightsNotCachedError(FileNotFoundError):
    """A tag or hub id whose files are not in the Hugging Face cache while the hub cannot be reached."""


@dataclass(frozen=True)
class ResolvedWeights:
    """Where a ``pretrained`` source led: ``kind`` is ``tag``, ``hf-hub``, ``folder`` or ``file``; ``path`` the local
    file to read; ``pretrained_cfg`` open_clip's tag entry (mean/std, quick_gelu) or ``{}``."""
    source: str
    kind: str
    path: str
    pretrained_cfg: dict = field(default_factory=dict)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ------------------------------------------------------------------------------------------------------ resolution
def _hub_cache_dir(cache_dir) -> str:
    from huggingface_hub import constants

    return os.fspath(cache_dir) if cache_dir else constants.HF_HUB_CACHE


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_errors(what: str, model_id: str, cache_dir, call):
    """Run ``call()`` (an open_clip download); a missing cache entry offline or any download failure becomes one
    line naming ``what`` and the hub id."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return call()
    except (OSError, RuntimeError) as e:  # open_clip wraps hub errors in FileNotFoundError; urllib raises URLError
        cause = e.__context__ if e.__context__ is not None else e
        if _offline() or isinstance(cause, LocalEntryNotFoundError):
            raise WeightsNotCachedError(
                f"{what}: {model_id} is not in the Hugging Face cache ({_hub_cache_dir(cache_dir)}) and the hub "
                f"cannot be reached{' (HF_HUB_OFFLINE is set)' if _offline() else ''}: it must be downloaded once on "
                f"a machine with network (the same command there fills the cache)") from None
        raise ValueError(f"{what}: cannot get {model_id} from the Hugging Face hub: {_first_line(cause)}") from None


def hub_file(model_id: str, filename: str | None = None, *, cache_dir=None, what: str | None = None) -> str:
    """Local path of ``filename`` (default: open_clip's weights file, safetensors preferred) of hub repo
    ``model_id``, through ``open_clip.pretrained.download_pretrained_from_hf`` and the Hugging Face cache."""

    return _hub_errors(what or f"hf-hub:{model_id}", model_id, cache_dir,
                       lambda: download_pretrained_from_hf(model_id, filename=filename, cache_dir=cache_dir))


def folder_weights(folder) -> str:
    """The weights file open_clip picks in a hub-style folder (``open_clip_model.safetensors`` first, then
    ``open_clip_pytorch_model.bin``, ...; ``open_clip.factory._find_checkpoint_in_dir``)."""

    found = find_checkpoint_in_dir(Path(folder))
    if found is None:
        raise FileNotFoundError(f"no weights file in folder {os.fspath(folder)} (expected open_clip_model.safetensors "
                                f"or open_clip_pytorch_model.bin)")
    return found


def _resolve_tag(source: str, model_name: str | None, cache_dir) -> ResolvedWeights | None:

    if not model_name or model_name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
        return None
    config = model_name.replace("/", "-")  # open_clip's own cleaning of config names
    cfg = P.get_pretrained_cfg(config, source)
    if not cfg:
        return None
    hub_id = cfg.get("hf_hub", "").rstrip("/") or cfg.get("url", "")
    what = f"pretrained tag {source!r} of {config}"
    path = _hub_errors(what, hub_id, cache_dir, lambda: P.download_pretrained(cfg, cache_dir=cache_dir))
    if not path:
        raise ValueError(f"{what}: open_clip's entry names no file, hub id or URL")
    return ResolvedWeights(source, "tag", path, dict(cfg))


def _looks_like_path(source: str) -> bool:
    return (os.sep in source or "/" in source or source.startswith(("~", "."))
            or source.lower().endswith(_WEIGHT_SUFFIXES))


def resolve_pretrained(source, model_name: str | None = None, *, cache_dir=None) -> ResolvedWeights:
    """Resolve ``source`` to a local weights file, in open_clip's order: ``hf-hub:org/repo``; a pretrained tag of
    ``model_name`` (``laion2b_s34b_b79k``, ``openai``); an existing folder (hub layout) or file. Raises
    FileNotFoundError for a missing path or cache entry (WeightsNotCachedError), ValueError for an unknown tag
    (listing the config's tags) or a failed download; every message is one line naming ``source``."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"pretrained source must be a tag, hub id or path, got {type(source).__name__}")
    s = os.fspath(source)
    if not s:
        raise ValueError("pretrained source is empty")
    if s.startswith(HF_HUB_PREFIX):
        model_id = s[len(HF_HUB_PREFIX):].strip("/")
        if not model_id:
            raise ValueError(f"pretrained {s!r}: empty hub id after 'hf-hub:'")
        path = hub_file(model_id, cache_dir=cache_dir, what=f"pretrained {s!r}")
        _fetch_sidecar_config(model_id, cache_dir)
        return ResolvedWeights(s, "hf-hub", path)
    if "://" in s:
        raise ValueError(f"pretrained {s!r}: URLs are not read; use an open_clip tag, an hf-hub: id or a local file")
    tagged = _resolve_tag(s, model_name, cache_dir)
    if tagged is not None:
        return tagged
    p = os.path.expanduser(s)
    if os.path.isdir(p):
        return ResolvedWeights(s, "folder", folder_weights(p))
    if os.path.isfile(p):
        return ResolvedWeights(s, "file", p)
    if _looks_like_path(s):
        raise FileNotFoundError(f"pretrained {s!r}: no such file or folder")
    raise ValueError(_unknown_tag_message(s, model_name))


def recordable_source(source, model_name: str | None = None) -> str | None:
    """``source`` in a form that resolves the same from any working directory, for run records: ``hf-hub:`` ids and
    pretrained tags of ``model_name`` as given, existing local files and folders as absolute paths."""
    if source is None:
        return None
    s = os.fspath(source)
    if s.startswith(HF_HUB_PREFIX):
        return s
    if model_name and not model_name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):

        if is_pretrained_cfg(model_name.replace("/", "-"), s):
            return s
    p = os.path.expanduser(s)
    return os.path.abspath(p) if os.path.exists(p) else s


def _unknown_tag_message(tag: str, model_name: str | None) -> str:

    if not model_name:
        return (f"pretrained {tag!r} is not a file, folder or hf-hub: id; to use it as an open_clip pretrained tag, "
                f"give the model config name (model_name=...)")
    config = model_name.replace("/", "-")
    tags = list_pretrained_tags_by_model(config)
    if not tags:
        return f"pretrained {tag!r}: not a file or folder, and open_clip has no pretrained tags for {config}"
    return f"pretrained {tag!r}: unknown tag for {config} and not a file or folder; valid tags: {', '.join(tags)}"


def _fetch_sidecar_config(model_id: str, cache_dir) -> None:
    """Bring the repo's ``open_clip_config.json`` next to its weights when it can be had (it tells whether the
    weights were trained with QuickGELU and their preprocessing); its absence is not an error."""

    try:
        hub_file(model_id, HF_CONFIG_NAME, cache_dir=cache_dir)
    except (FileNotFoundError, ValueError):
        pass


def _sidecar_config(weights_path: str) -> dict:
    """``open_clip_config.json`` beside a weights file (hub snapshot or folder), or {}."""

    cfg_path = os.path.join(os.path.dirname(os.path.abspath(weights_path)), HF_CONFIG_NAME)
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


# ------------------------------------------------------------------------------------------------------ reading
def is_torchscript_archive(path) -> bool:
    """True for a TorchScript zip (what ``torch.jit.save`` writes: it holds ``constants.pkl`` and code)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def read_state_dict(path, *, trust_torchscript: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, read without running code from it: safetensors, or
    ``torch.load(weights_only=True)`` (an open_clip training checkpoint's ``state_dict`` is unwrapped). A TorchScript
    archive is read with ``torch.jit.load`` only when ``trust_torchscript`` (it executes the archive's code)."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"no weights file at {p}")
    if p.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            sd = load_file(p, device="cpu")
        except Exception as e:  # safetensors raises its own error types for every malformed file
            raise ValueError(f"{p} is not a readable safetensors file: {_first_line(e)}") from None
    elif is_torchscript_archive(p):
        sd = _read_torchscript(p, trust_torchscript)
    else:
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle, zip and torch errors alike: the file is not plain tensors
            raise ValueError(f"cannot read weights from {p} safely (torch.load weights_only=True): "
                             f"{_first_line(e)}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{p} does not hold a state dict of tensors")
    return dict(sd)


def _read_torchscript(path: str, trust: bool) -> dict:
    if not trust:
        raise ValueError(f"{path} is a TorchScript archive (OpenAI's original .pt format); loading one runs code "
                         f"stored in the file, so it is refused: use open_clip's 'openai' tag (--pretrained openai, "
                         f"safetensors) or, if you trust this file, --trust-torchscript (trust_torchscript=True)")
    warnings.warn(f"reading the TorchScript archive {path} with torch.jit.load: it runs code stored in the file, "
                  f"which is trusted because trust_torchscript was given", UserWarning, stacklevel=3)
    try:
        return torch.jit.load(path, map_location="cpu").state_dict()
    except Exception as e:  # a broken archive: report it as bad input
        raise ValueError(f"cannot read the TorchScript archive {path}: {_first_line(e)}") from None


# ------------------------------------------------------------------------------------------------------ layout
def _resize_visual_pos_embed(sd: dict, model: nn.Module) -> None:
    """open_clip's ``resize_pos_embed`` (bicubic, antialiased, class token kept) when the file's square grid
    differs from the model's; other differences are left for the shape check to report."""

    old = sd.get("visual.positional_embedding")
    cur = getattr(getattr(model, "visual", None), "positional_embedding", None)
    if old is None or cur is None or not hasattr(model.visual, "grid_size") or old.ndim != 2 or cur.ndim != 2:
        return
    side = math.isqrt(old.shape[0] - 1) if old.shape[0] > 1 else 0
    if old.shape == cur.shape or old.shape[1] != cur.shape[1] or side * side != old.shape[0] - 1:
        return
    resize_pos_embed(sd, model)


def to_model_layout(sd: dict, model: nn.Module) -> dict:
    """The steps of ``open_clip.factory.load_checkpoint`` between reading and ``load_state_dict``, with open_clip's
    helpers: ``module.`` prefixes and OpenAI's extra scalars dropped, third-party layouts converted, the old text
    layout mapped to CustomTextCLIP's, ``logit_scale``/``logit_bias`` shapes matched, positional embeddings resized."""

    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    for k in _OPENAI_KEYS:
        sd.pop(k, None)
    sd = convert_state_dict(model, sd)
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    for name in ("logit_scale", "logit_bias"):
        cur = getattr(model, name, None)
        if isinstance(cur, torch.Tensor) and name in sd and sd[name].ndim != cur.ndim and sd[name].numel() == 1:
            sd[name] = sd[name].reshape(cur.shape)
    if isinstance(getattr(model, "logit_bias", None), torch.Tensor) and "logit_bias" not in sd and "logit_scale" in sd:
        sd["logit_bias"] = torch.zeros_like(sd["logit_scale"])  # a CLIP checkpoint into a SigLIP-style model
    sd.pop("text.transformer.embeddings.position_ids", None)
    _resize_visual_pos_embed(sd, model)
    text_pos = sd.get("positional_embedding", sd.get("text.positional_embedding"))
    model_text_pos = getattr(model, "positional_embedding", None)
    if text_pos is not None and model_text_pos is not None and text_pos.shape[1:] == model_text_pos.shape[1:]:
        resize_text_pos_embed(sd, model)
    return sd


# ------------------------------------------------------------------------------------------------------ loading
def _uses_quickgelu(model: nn.Module) -> bool:

    return any(isinstance(m, QuickGELU) for m in model.modules())


def _weights_quickgelu(resolved: ResolvedWeights, raw_keys: set) -> bool | None:
    """Whether the weights were trained with QuickGELU: the tag's entry, the repo's config, or OpenAI's TorchScript
    scalars / an 'openai' name; None when unknown."""
    if resolved.kind == "tag":
        return bool(resolved.pretrained_cfg.get("quick_gelu", False))
    model_cfg = _sidecar_config(resolved.path).get("model_cfg")
    if isinstance(model_cfg, dict):
        return bool(model_cfg.get("quick_gelu", False))
    name = os.path.basename(os.path.normpath(resolved.source)).lower()
    if any(k in raw_keys for k in _OPENAI_KEYS) or "openai" in name:
        return True
    return None


def _warn_activation(resolved: ResolvedWeights, trained_quickgelu: bool | None, model: nn.Module) -> None:
    name = os.path.basename(os.path.normpath(resolved.source))
    if trained_quickgelu and not _uses_quickgelu(model):
        warnings.warn(f"{name} looks like an OpenAI CLIP checkpoint (trained with QuickGELU) but the model uses "
                      f"nn.GELU: features will be off; build the '-quickgelu' config instead", UserWarning,
                      stacklevel=3)
    elif trained_quickgelu is False and resolved.kind == "tag" and _uses_quickgelu(model):
        warnings.warn(f"pretrained tag {resolved.source!r} was trained with nn.GELU but the model uses QuickGELU: "
                      f"features will be off; build the config without '-quickgelu'", UserWarning, stacklevel=3)


def _apply_preprocess(model: nn.Module, resolved: ResolvedWeights) -> None:
    """Attach the weights' preprocessing (mean/std/interpolation of the tag or the repo config) as open_clip does."""

    extra = resolved.pretrained_cfg if resolved.kind == "tag" else _sidecar_config(resolved.path).get("preprocess_cfg")
    if not isinstance(extra, dict) or not extra or not hasattr(model, "visual"):
        return
    cur = dict(get_model_preprocess_cfg(model))
    if "mean" not in cur or "std" not in cur:
        return
    merged = merge_preprocess_dict(cur, extra)
    merged["size"] = cur.get("size", merged.get("size"))  # the model's own input size wins, as in create_model
    set_model_preprocess_cfg(model, merged)


def _check_and_copy(model: nn.Module, sd: dict, where: str) -> int:
    """Every key of the model (but modules a PEFT method added) present with its shape, no extra keys; then copy."""

    added = set(utils.added_modules(model))
    msd = model.state_dict(keep_vars=True)
    expected = {k for k in msd if k.split(".")[0] not in added}
    problems = []
    if expected - set(sd):
        problems.append(f"missing keys {utils.name_list(expected - set(sd))}")
    if set(sd) - set(msd):
        problems.append(f"unexpected keys {utils.name_list(set(sd) - set(msd))}")
    for k in sorted(expected & set(sd)):
        if tuple(msd[k].shape) != tuple(sd[k].shape):
            problems.append(f"shape mismatch for {k}: model {tuple(msd[k].shape)}, file {tuple(sd[k].shape)}")
    if problems:
        raise ValueError(f"weights in {where} do not match the model: " + "; ".join(problems))
    with torch.no_grad():
        for k in expected:
            msd[k].copy_(sd[k])
    return len(expected)


def load_pretrained(model: nn.Module, source, *, model_name: str | None = None, cache_dir=None,
                    trust_torchscript: bool = False) -> dict:
    """Load full open_clip weights into ``model`` from ``source``: a pretrained tag of ``model_name``, an
    ``hf-hub:org/repo`` id, a hub folder or a local file (see the module docstring). Nothing is copied unless every
    key and shape matches. Warns when QuickGELU-trained weights (OpenAI's) go into a GELU model. Returns
    ``{"source", "kind", "path", "openai", "num_tensors", "resized_pos_embed"}``."""
    resolved = resolve_pretrained(source, model_name, cache_dir=cache_dir)
    raw = read_state_dict(resolved.path, trust_torchscript=trust_torchscript)
    raw_keys = set(raw)
    old_pos = raw.get("visual.positional_embedding", raw.get("module.visual.positional_embedding"))
    sd = to_model_layout(raw, model)
    trained_quickgelu = _weights_quickgelu(resolved, raw_keys)
    _warn_activation(resolved, trained_quickgelu, model)
    where = resolved.path if resolved.kind == "file" else f"{resolved.source} ({resolved.path})"
    n = _check_and_copy(model, sd, where)
    _apply_preprocess(model, resolved)
    new_pos = sd.get("visual.positional_embedding")
    resized = None if old_pos is None or new_pos is None or old_pos.shape == new_pos.shape else \
        [tuple(old_pos.shape), tuple(new_pos.shape)]
    return {"source": resolved.source, "kind": resolved.kind, "path": resolved.path,
            "openai": bool(trained_quickgelu), "num_tensors": n, "resized_pos_embed": resized}


# ------------------------------------------------------------------------------------------------------ building
CONFIG_FILE_MAX_BYTES = 1 << 20  # an open_clip_config.json is a few KB; a larger one is not a config


def _schema_model(model_name: str, pretrained, cache_dir) -> tuple[str, str]:
    """For ``hf-hub:``/``local-dir:`` model names: (the weights source the name carries, its config file), both
    checked to exist (one-line errors) before anything is built."""

    if pretrained is not None:
        raise ValueError(f"model {model_name!r} carries its own weights; drop pretrained={pretrained!r} (open_clip "
                         f"ignores it for hf-hub:/local-dir: names)")
    if model_name.startswith(HF_HUB_PREFIX):
        model_id = model_name[len(HF_HUB_PREFIX):].strip("/")
        if not model_id:
            raise ValueError(f"model {model_name!r}: empty hub id after 'hf-hub:'")
        config = hub_file(model_id, HF_CONFIG_NAME, cache_dir=cache_dir, what=f"model {model_name!r}")
        hub_file(model_id, cache_dir=cache_dir, what=f"model {model_name!r}")  # its weights, before the build
        return f"{HF_HUB_PREFIX}{model_id}", config
    folder = os.path.expanduser(model_name[len(LOCAL_DIR_PREFIX):])
    if not folder:
        raise ValueError(f"model {model_name!r}: empty path after 'local-dir:'")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model {model_name!r}: no such folder {folder}")
    config = os.path.join(folder, HF_CONFIG_NAME)
    if not os.path.isfile(config):
        raise FileNotFoundError(f"model {model_name!r}: the folder has no {HF_CONFIG_NAME}")
    folder_weights(folder)  # the weights the name carries, before the build
    return folder, config


def read_model_config(path: str) -> dict:
    """The ``model_cfg`` of an open_clip_config.json, read as untrusted input (size, JSON, nesting, an object)."""
    try:
        if os.path.getsize(path) > CONFIG_FILE_MAX_BYTES:
            raise ValueError(f"model config {path} is over {CONFIG_FILE_MAX_BYTES} bytes: not an open_clip config")
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read model config {path}: {_first_line(e)}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"model config {path} is not valid JSON: {e}") from None
    except RecursionError:  # json's decoder recurses once per nesting level
        raise ValueError(f"model config {path} nests too deeply to be an open_clip config") from None
    cfg = raw.get("model_cfg") if isinstance(raw, dict) else None
    if not isinstance(cfg, dict):
        raise ValueError(f"model config {path} has no model_cfg object (open_clip's open_clip_config.json layout)")
    return cfg


def check_config(cfg: dict, image_size, where: str) -> None:
    """``cfg`` (an open_clip model config) with ``image_size`` applied as open_clip applies it, within the bounds
    of ``leanclip.models.openclip_config``; ValueError prefixed with ``where`` otherwise."""
    from leanclip.models.openclip_config import check_model_config

    if image_size is not None:
        cfg = {**cfg, "vision_cfg": {**(cfg.get("vision_cfg") or {}), "image_size": image_size}}
    try:
        check_model_config(cfg)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _build(model_name: str, seed: int, config_file: str | None, kw: dict) -> nn.Module:
    """``create_random_model``; a config file open_clip still cannot build (a timm model name timm does not know, a
    pooling type open_clip rejects, ...) is a ValueError naming the file rather than open_clip's traceback."""
    if config_file is None:
        return create_random_model(model_name, seed, **kw)
    try:
        return create_random_model(model_name, seed, **kw)
    except (TypeError, ValueError, KeyError, IndexError, AssertionError, ZeroDivisionError, RuntimeError, OSError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else "an assertion inside open_clip failed"
        raise ValueError(f"model {model_name!r}: open_clip cannot build the config in {config_file}: "
                         f"{type(e).__name__}: {detail}") from None


def create_model(model_name: str, pretrained=None, *, seed: int = 0, image_size: int | None = None, cache_dir=None,
                 trust_torchscript: bool = False, **kw) -> nn.Module:
    """Build ``model_name`` (an open_clip config name, ``hf-hub:org/repo`` or ``local-dir:DIR``; ``transformers:<id>``
    is built by ``leanclip.models.transformers.create_model`` from its own weights) with seeded random
    init (``leanclip.configs.create_random_model``), then load ``pretrained`` (any form :func:`resolve_pretrained`
    accepts) or the weights an ``hf-hub:``/``local-dir:`` name carries through :func:`load_pretrained`.
    ``image_size`` overrides the input resolution; the positional embedding of the weights is resized to it.
    The config (a file's above all) is checked field by field and its size bounded before anything is built
    (:func:`check_config`)."""
    import open_clip

    from leanclip.models import transformers as hf

    if hf.is_name(model_name):  # a transformers model: the hub id is the weights (leanclip.models.transformers)
        return hf.create_model(model_name, pretrained, image_size=image_size, cache_dir=cache_dir)
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model must be an open_clip config name, hf-hub: id, local-dir: path or transformers: id, "
                         f"got {model_name!r}")
    config_file = None
    if model_name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
        pretrained, config_file = _schema_model(model_name, pretrained, cache_dir)
        check_config(read_model_config(config_file), image_size, f"model {model_name!r}: {config_file}")
        kw["load_weights"] = False  # open_clip would read the weights itself; leanclip's reader does it below
        config_name = None
    else:
        config_name = model_name.replace("/", "-")
        if open_clip.get_model_config(config_name) is None:
            raise ValueError(f"unknown open_clip model config {model_name!r} (see open_clip.list_models())")
        check_config(open_clip.get_model_config(config_name), image_size, f"model {model_name!r}")
    if image_size is not None:
        kw["force_image_size"] = image_size
    if cache_dir is not None:
        kw["cache_dir"] = cache_dir
    # open_clip never fetches tower weights a config merely names (timm / Hugging Face towers): those readers are not
    # leanclip's, and the weights come from `pretrained` below. A registered config that asks for them explicitly
    # ("timm_model_pretrained": true / "hf_model_pretrained": true, leanclip.configs.register_unaligned_config(...,
    # pretrained=True): LilT's separately pretrained towers) gets them from timm / transformers when no joint
    # weights are given.
    cfg = open_clip.get_model_config(config_name) if config_name and pretrained is None else None
    kw.update(pretrained_image=bool(cfg and cfg.get("vision_cfg", {}).get("timm_model_pretrained") is True),
              pretrained_text=bool(cfg and cfg.get("text_cfg", {}).get("hf_model_pretrained") is True))
    model = _build(model_name, seed, config_file, kw)
    if pretrained is not None:
        load_pretrained(model, pretrained, model_name=config_name, cache_dir=cache_dir,
                        trust_torchscript=trust_torchscript)
    return model
