"""Checkpoints: trainable-only safetensors (+ optimizer state) and local pretrained open_clip weights.

``save_trainable(model, path, optimizer=..., step=..., extra_meta=...)`` writes ONE safetensors file, atomically
(``leanclip.utils.atomic_write``: temp file in the same directory, fsync, ``os.replace``):

- tensors: every trainable parameter (open_clip names, e.g. ``visual.ln_pre.weight``) and the persistent buffers of
  modules the method added (e.g. ``llu_image.bank``); optimizer state tensors as ``optim/<param name>/<key>`` and
  tensor-valued group hyper-parameters as ``optim_group/<i>/<key>``;
- metadata (strings): ``format``, ``method``, ``model_name``, ``options`` (JSON), ``version``, ``param_names`` and
  ``buffer_names`` (JSON lists), ``step``, ``extra`` (JSON of ``extra_meta``), ``optimizer`` (JSON: class,
  param groups with parameter names instead of indices, per-parameter non-tensor state) and ``architecture``.

``architecture`` fingerprints the model the trainable tensors were trained against: the config name when known and
a digest of the names and shapes of the FROZEN parameters (plus the shapes themselves, for the error message).
Trainable LayerNorms of ViT-B-32 and ViT-B-16 have the same shapes; their patch embeddings and positional
embeddings do not, so only the frozen side tells the two apart.

``sha256`` (metadata) is :func:`leanclip.utils.tensors_sha256` of every tensor and every other metadata string,
recorded at save time and checked by every reader (:func:`verify`, ``load_trainable``, ``load_into``,
``read_trainable``, ``init_from``): a file damaged anywhere after its header (a torn copy, a bad disk sector, a
corrupted tail) is a one-line ValueError naming it, never numbers silently used. It lives in the header, written
in the same atomic write as the tensors, so no second file can get out of step with the checkpoint, and a damaged
tail cannot take the digest with it (a damaged header is not a readable safetensors file at all). A checkpoint
written before the digest existed (no ``sha256`` key) still loads, with a warning that its integrity cannot be
checked: refusing would strand every earlier run, and such a file is no less trustworthy than it was before.

``load_trainable`` checks format, method, names, shapes and the architecture BEFORE copying anything (ValueError,
never a partial load; files without a fingerprint still load), restores the optimizer exactly (SGD momentum, AdamW
exp_avg / exp_avg_sq / step) and returns the metadata. ``load_pretrained`` loads full open_clip weights from a tag,
hub id, folder or local file (:mod:`leanclip.weights`).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings

import torch
from torch import nn

from leanclip import utils, weights
from leanclip.select import model_device, trainable_parameters

FORMAT = "leanclip-trainable/1"
_OPT_PREFIX = "optim/"
_GROUP_PREFIX = "optim_group/"


# ----------------------------------------------------------------------------------------------------------- helpers
def _added_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Persistent, non-None buffers of the modules the method added (name -> tensor)."""
    out = {}
    for mod_name in utils.added_modules(model):
        mod = model._modules[mod_name]
        params = {n for n, _ in mod.named_parameters()}
        for k, v in mod.state_dict(keep_vars=True).items():
            if k not in params and isinstance(v, torch.Tensor):
                out[f"{mod_name}.{k}"] = v
    return out


def _buffer_slot(model: nn.Module, name: str):
    """(module, attr) of a registered buffer named ``name`` inside an added module, or None."""
    mod_name = name.split(".")[0]
    if mod_name not in utils.added_modules(model):
        return None
    owner_path, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_path)
    except AttributeError:
        return None
    if attr in owner._buffers and attr not in owner._non_persistent_buffers_set:
        return owner, attr
    return None


def _digest(tensors: dict, metadata: dict) -> str:
    """The ``sha256`` a checkpoint records: its tensors and its other metadata strings (in key order)."""
    rest = json.dumps(sorted((k, v) for k, v in metadata.items() if k != "sha256"))
    return utils.tensors_sha256(tensors, rest)


def _atomic_save(tensors: dict, metadata: dict, path: str) -> None:
    """``save_file`` through :func:`leanclip.utils.atomic_write`, folder fsynced too so the rename is durable; the
    metadata gets the payload's ``sha256``."""
    from safetensors.torch import save_file

    metadata = {**metadata, "sha256": _digest(tensors, metadata)}
    utils.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), sync_dir=True)


def _check_format(path: str, meta: dict) -> None:
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a leanclip trainable checkpoint (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")


def _open(path, *, tensors: bool) -> tuple[dict, dict]:
    """``(metadata, tensors)`` of a safetensors file whose metadata has the checkpoint format (tensors read only when
    asked); FileNotFoundError / ValueError naming ``path`` otherwise."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            read = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    _check_format(path, meta)
    return meta, read


def read_metadata(path) -> dict:
    """The metadata strings of a :func:`save_trainable` file, from its header alone: no tensor is read and the
    digest is not checked (for checks that come before any work; a load checks everything)."""
    return _open(path, tensors=False)[0]


def _read(path):
    """``(metadata, tensors)`` of a checkpoint whose payload matches its recorded ``sha256``."""
    meta, tensors = _open(path, tensors=True)
    if "sha256" not in meta:
        warnings.warn(f"checkpoint {path} records no sha256 (written before leanclip recorded one): its integrity "
                      f"cannot be checked", stacklevel=3)
    elif meta["sha256"] != _digest(tensors, meta):
        raise ValueError(f"checkpoint {path} is damaged: its contents do not match the sha256 recorded when it was "
                         f"written")
    return meta, tensors


def verify(path) -> None:
    """ValueError (FileNotFoundError) unless ``path`` is a readable :func:`save_trainable` file whose tensors and
    metadata match the ``sha256`` it recorded when it was written (see the module docstring for files without one)."""
    _read(path)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def _enc(v, tensors: dict, key: str):
    """JSON-encode an optimizer value; tensors go to ``tensors[key]``."""
    if isinstance(v, torch.Tensor):
        tensors[key] = _cpu(v)
        return {"__tensor__": key}
    if isinstance(v, tuple):
        return {"__tuple__": [_enc(x, tensors, f"{key}/{i}") for i, x in enumerate(v)]}
    if isinstance(v, list):
        return [_enc(x, tensors, f"{key}/{i}") for i, x in enumerate(v)]
    if isinstance(v, dict):
        return {"__dict__": {str(k): _enc(x, tensors, f"{key}/{k}") for k, x in v.items()}}
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return {"__float__": repr(v)}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise ValueError(f"cannot save optimizer value of type {type(v).__name__} at {key}")


def _dec(v, tensors: dict):
    if isinstance(v, dict):
        if "__tensor__" in v:
            key = v["__tensor__"]
            if key not in tensors:
                raise ValueError(f"checkpoint lacks optimizer tensor {key!r}")
            return tensors[key]
        if "__tuple__" in v:
            return tuple(_dec(x, tensors) for x in v["__tuple__"])
        if "__dict__" in v:
            return {k: _dec(x, tensors) for k, x in v["__dict__"].items()}
        if "__float__" in v:
            return float(v["__float__"])
    if isinstance(v, list):
        return [_dec(x, tensors) for x in v]
    return v


def _optimizer_names(model: nn.Module, optimizer) -> list[list[str]]:
    id2name = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for gi, g in enumerate(optimizer.param_groups):
        names = []
        for p in g["params"]:
            if id(p) not in id2name:
                raise ValueError(f"optimizer param group {gi} holds a tensor that is not a parameter of the model")
            names.append(id2name[id(p)])
        groups.append(names)
    return groups


def architecture(model: nn.Module) -> dict:
    """``{"model_name", "frozen_digest", "frozen_shapes"}`` of a prepared model: the names and shapes of its frozen
    parameters outside the modules the method added (dtype and lean swaps do not change them). A model family that
    states what its shapes do not show (``architecture_fingerprint()``: a ``transformers`` model's class, activation
    and LayerNorm eps) has that in the digest too."""
    info = getattr(model, "leanclip_info", None) or {}
    added = set(utils.added_modules(model))
    shapes = {n: list(p.shape) for n, p in model.named_parameters()
              if not p.requires_grad and n.split(".")[0] not in added}
    stated = getattr(model, "architecture_fingerprint", None)
    key = sorted(shapes.items()) if not callable(stated) else [sorted(shapes.items()), stated()]
    digest = hashlib.sha256(utils.json_dumps(key).encode()).hexdigest()[:16]
    return {"model_name": info.get("model_name"), "frozen_digest": digest, "frozen_shapes": shapes}


def _shape_differences(saved: dict, current: dict, k: int = 3) -> str:
    diff = [f"{n} {tuple(saved[n])} vs {tuple(current[n])}" for n in sorted(set(saved) & set(current))
            if list(saved[n]) != list(current[n])]
    only_saved, only_cur = sorted(set(saved) - set(current)), sorted(set(current) - set(saved))
    parts = diff[:k] + ([f"only in the checkpoint's: {utils.name_list(only_saved, k)}"] if only_saved else []) \
        + ([f"only in the model's: {utils.name_list(only_cur, k)}"] if only_cur else [])
    return "; ".join(parts) + (f" (+{len(diff) - k} more shape differences)" if len(diff) > k else "")


def _check_architecture(model: nn.Module, meta: dict, path) -> None:
    """The frozen tensors the checkpoint was trained against are those of ``model`` (same digest)."""
    saved = json.loads(meta.get("architecture", "null") or "null")
    if not saved:
        return  # files written before the fingerprint existed
    cur = architecture(model)
    if saved.get("frozen_digest") == cur["frozen_digest"]:
        return
    raise ValueError(
        f"checkpoint {os.fspath(path)} was trained against another architecture: checkpoint "
        f"{saved.get('model_name') or 'unnamed model'} (frozen fingerprint {saved.get('frozen_digest')}), model "
        f"{cur['model_name'] or 'unnamed model'} ({cur['frozen_digest']}); frozen tensors differ: "
        f"{_shape_differences(saved.get('frozen_shapes', {}), cur['frozen_shapes'])}")


def _check_frozen_shapes(model: nn.Module, meta: dict, path) -> None:
    """For ``load_into`` (another method, so another frozen set): every recorded frozen tensor the model also has
    must have the recorded shape."""
    saved = json.loads(meta.get("architecture", "null") or "null")
    if not saved:
        return
    params = {n: list(p.shape) for n, p in model.named_parameters()}
    common = {n: s for n, s in saved.get("frozen_shapes", {}).items() if n in params}
    if any(list(s) != params[n] for n, s in common.items()):
        raise ValueError(f"checkpoint {os.fspath(path)} was trained against another architecture "
                         f"({saved.get('model_name') or 'unnamed model'}): "
                         f"{_shape_differences(common, {n: params[n] for n in common})}")


# ----------------------------------------------------------------------------------------------------------- save
def save_trainable(model: nn.Module, path, *, optimizer: torch.optim.Optimizer | None = None, step: int | None = None,
                   extra_meta: dict | None = None) -> str:
    """Save the trainable parameters (+ added-module buffers, + optimizer state and step) of a prepared model to
    ``path`` (safetensors, atomic). Returns the path."""
    info = getattr(model, "leanclip_info", None)
    if not info:
        raise ValueError("model was not prepared with leanclip.prepare (no model.leanclip_info)")
    params = dict(trainable_parameters(model))
    buffers = _added_buffers(model)
    if not params and not buffers:
        raise ValueError("model has no trainable parameters to save")
    tensors = {n: _cpu(p) for n, p in params.items()}
    tensors.update({n: _cpu(b) for n, b in buffers.items()})
    meta = {
        "format": FORMAT,
        "method": str(info.get("method")),
        "model_name": utils.json_dumps(info.get("model_name")),
        "options": utils.json_dumps(info.get("options", {})),
        "version": str(info.get("version")),
        "modules": utils.json_dumps(info.get("modules", [])),
        "param_names": utils.json_dumps(list(params)),
        "buffer_names": utils.json_dumps(list(buffers)),
        "step": utils.json_dumps(None if step is None else int(step)),
        "extra": utils.json_dumps(extra_meta if extra_meta is not None else None),
        "architecture": utils.json_dumps(architecture(model)),
    }
    if optimizer is not None:
        names = _optimizer_names(model, optimizer)
        flat = [n for g in names for n in g]
        not_trainable = [n for n in flat if n not in params]
        if not_trainable:
            raise ValueError(f"optimizer holds frozen parameters {not_trainable[:5]}: build it from the trainable ones")
        sd = optimizer.state_dict()
        groups = []
        for gi, (g, gnames) in enumerate(zip(sd["param_groups"], names)):
            hyper = {k: _enc(v, tensors, f"{_GROUP_PREFIX}{gi}/{k}") for k, v in g.items() if k != "params"}
            groups.append({"params": gnames, "hyper": hyper})
        state = {}
        for idx, st in sd["state"].items():
            name = flat[idx]
            state[name] = {k: _enc(v, tensors, f"{_OPT_PREFIX}{name}/{k}") for k, v in st.items()}
        meta["optimizer"] = utils.json_dumps({"class": type(optimizer).__name__, "param_groups": groups, "state": state})
    _atomic_save(tensors, meta, path)
    return os.fspath(path)


# ----------------------------------------------------------------------------------------------------------- load
def _split_file(meta: dict, tensors: dict):
    pnames = json.loads(meta.get("param_names", "[]"))
    bnames = json.loads(meta.get("buffer_names", "[]"))
    missing = [n for n in pnames + bnames if n not in tensors]
    if missing:
        raise ValueError(f"checkpoint is corrupt: tensors {missing[:5]} listed in its metadata are absent")
    return {n: tensors[n] for n in pnames}, {n: tensors[n] for n in bnames}


def read_trainable(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(metadata, {name: tensor})`` of a ``save_trainable`` file without a model: the trainable parameters only
    (no buffers, no optimizer state); metadata values are the raw strings (JSON where :func:`save_trainable` wrote
    JSON). For analyses that compare runs (``leanclip.cli.analyze``)."""
    meta, tensors = _read(path)
    params, _ = _split_file(meta, tensors)
    return meta, params


def _check_and_copy(model: nn.Module, fparams: dict, fbuffers: dict, *, strict: bool, path, then_check=None) -> None:
    """Verify every name/shape, then ``then_check()`` (which raises to refuse), then copy. strict: the file's
    parameters must be exactly the trainable ones."""
    all_params = dict(model.named_parameters())
    problems = []
    if strict:
        want = set(dict(trainable_parameters(model)))
        have = set(fparams)
        if want - have:
            problems.append(f"missing from the checkpoint: {utils.name_list(want - have)}")
        if have - want:
            problems.append(f"not trainable in the model: {utils.name_list(have - want)}")
        want_b = set(_added_buffers(model))
        missing_b = want_b - set(fbuffers)
        if missing_b:
            problems.append(f"buffers missing from the checkpoint: {utils.name_list(missing_b)}")
    else:
        unknown = set(fparams) - set(all_params)
        if unknown:
            problems.append(f"not parameters of the model: {utils.name_list(unknown)}")
    slots = {}
    for n, t in fbuffers.items():
        slot = _buffer_slot(model, n)
        if slot is None:
            problems.append(f"buffer {n!r} has no place in the model")
        else:
            slots[n] = slot  # buffers (e.g. an LLU bank) are replaced, not copied into: their size may differ
    for n, t in fparams.items():
        p = all_params.get(n)
        if p is not None and tuple(p.shape) != tuple(t.shape):
            problems.append(f"shape mismatch for {n}: model {tuple(p.shape)}, checkpoint {tuple(t.shape)}")
    if problems:
        more = f"; (+{len(problems) - 4} more)" if len(problems) > 4 else ""
        raise ValueError(f"checkpoint {os.fspath(path)} does not match the model: " + "; ".join(problems[:4]) + more)
    if then_check is not None:
        then_check()
    with torch.no_grad():
        for n, t in fparams.items():
            all_params[n].copy_(t)
        for n, t in fbuffers.items():
            owner, attr = slots[n]
            cur = owner._buffers[attr]
            dev = cur.device if cur is not None else model_device(model)
            owner._buffers[attr] = t.to(dev).clone()


def load_trainable(model: nn.Module, path, *, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load a ``save_trainable`` checkpoint into a model prepared with the same method (and the optimizer state
    into ``optimizer`` when given). Everything is checked before anything is copied. Returns the metadata:
    ``{"method", "model_name", "options", "version", "modules", "param_names", "buffer_names", "step", "extra"}``."""
    meta, tensors = _read(path)
    info = getattr(model, "leanclip_info", None)
    if not info:
        raise ValueError(f"model was not prepared: call leanclip.prepare(model, {meta.get('method')!r}) before loading")
    if meta.get("method") != info.get("method"):
        raise ValueError(f"checkpoint {os.fspath(path)} is for method {meta.get('method')!r} but the model was "
                         f"prepared with {info.get('method')!r}")
    saved_name, cur_name = json.loads(meta.get("model_name", "null")), info.get("model_name")
    fparams, fbuffers = _split_file(meta, tensors)
    try:
        opt_sd = _optimizer_state(model, optimizer, meta, tensors, path) if optimizer is not None else None
        _check_and_copy(model, fparams, fbuffers, strict=True, path=path,
                        then_check=lambda: _check_architecture(model, meta, path))
    except ValueError as e:
        if saved_name and cur_name and saved_name != cur_name:  # the likely cause first
            raise ValueError(f"checkpoint {os.fspath(path)} was trained on model {saved_name!r}, not {cur_name!r}: "
                             f"{e}") from e
        raise
    if saved_name and cur_name and saved_name != cur_name:  # same shapes under another config name
        warnings.warn(f"checkpoint was saved from model {saved_name!r}, loaded into {cur_name!r}", stacklevel=2)
    if opt_sd is not None:
        optimizer.load_state_dict(opt_sd)
    return {
        "format": meta["format"],
        "method": meta.get("method"),
        "model_name": saved_name,
        "options": json.loads(meta.get("options", "{}")),
        "version": meta.get("version"),
        "modules": json.loads(meta.get("modules", "[]")),
        "param_names": list(fparams),
        "buffer_names": list(fbuffers),
        "step": json.loads(meta.get("step", "null")),
        "extra": json.loads(meta.get("extra", "null")),
    }


def _optimizer_state(model, optimizer, meta, tensors, path) -> dict:
    if "optimizer" not in meta:
        raise ValueError(f"checkpoint {os.fspath(path)} has no optimizer state")
    saved = json.loads(meta["optimizer"])
    if saved.get("class") != type(optimizer).__name__:
        raise ValueError(f"checkpoint optimizer is {saved.get('class')}, got {type(optimizer).__name__}")
    names = _optimizer_names(model, optimizer)
    if len(names) != len(saved["param_groups"]):
        raise ValueError(f"optimizer has {len(names)} param groups, checkpoint has {len(saved['param_groups'])}")
    groups, name2idx, idx = [], {}, 0
    for gi, (cur, sg) in enumerate(zip(names, saved["param_groups"])):
        if set(cur) != set(sg["params"]) or len(cur) != len(sg["params"]):
            raise ValueError(f"optimizer param group {gi} holds different parameters than the checkpoint's: "
                             f"missing {utils.name_list(set(sg['params']) - set(cur))}, extra {utils.name_list(set(cur) - set(sg['params']))}")
        g = {k: _dec(v, tensors) for k, v in sg["hyper"].items()}
        g["params"] = list(range(idx, idx + len(cur)))
        for n in cur:
            name2idx[n] = idx
            idx += 1
        groups.append(g)
    state = {}
    for name, st in saved["state"].items():
        if name not in name2idx:
            raise ValueError(f"checkpoint optimizer state for {name!r}, which the optimizer does not hold")
        state[name2idx[name]] = {k: _dec(v, tensors) for k, v in st.items()}
    return {"state": state, "param_groups": groups}


def check_init_from(model: nn.Module, path, *, skip_modules=()) -> list[str]:
    """The checks :func:`load_into` makes, without copying anything: ``path`` holds only base-model parameters, each
    a parameter of ``model`` (modules named in ``skip_modules`` left out) with the same shape, and the frozen tensors
    it records have their recorded shapes. ``prepare(..., init_from=)`` runs it before changing the model. Returns
    the parameter names the file holds."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"init_from must be a file path, got {type(path).__name__}")
    meta, tensors = _read(path)
    fparams, fbuffers = _split_file(meta, tensors)
    if fbuffers:
        raise ValueError(f"checkpoint {os.fspath(path)} holds buffers of added modules ({utils.name_list(fbuffers)}); "
                         f"only parameters of the base model can initialize another method")
    skip = set(skip_modules)
    params = {n: p for n, p in model.named_parameters() if n.split(".")[0] not in skip}
    unknown = set(fparams) - set(params)
    if unknown:
        raise ValueError(f"init_from {os.fspath(path)}: not parameters of the model: {utils.name_list(unknown)}")
    for n, t in fparams.items():
        if tuple(params[n].shape) != tuple(t.shape):
            raise ValueError(f"init_from {os.fspath(path)}: shape mismatch for {n}: model {tuple(params[n].shape)}, "
                             f"checkpoint {tuple(t.shape)}")
    _check_frozen_shapes(model, meta, path)
    return list(fparams)


def load_into(model: nn.Module, path) -> dict:
    """Copy the parameters of a trainable-only checkpoint into ``model`` whatever its method and requires_grad
    flags ("LN as initialization", ``prepare(..., init_from=path)``). Every name must be a model parameter with
    the same shape, and the frozen tensors the checkpoint records must have their recorded shapes where the model
    has them (ValueError otherwise; nothing is copied). Optimizer state is ignored. Returns the metadata."""
    meta, tensors = _read(path)
    fparams, fbuffers = _split_file(meta, tensors)
    if fbuffers:
        raise ValueError(f"checkpoint {os.fspath(path)} holds buffers of added modules ({utils.name_list(fbuffers)}); "
                         f"only parameters of the base model can initialize another method")
    _check_and_copy(model, fparams, {}, strict=False, path=path,
                    then_check=lambda: _check_frozen_shapes(model, meta, path))
    return {"method": meta.get("method"), "param_names": list(fparams)}


# ----------------------------------------------------------------------------------------------------------- pretrained
def load_pretrained(model: nn.Module, source, *, model_name: str | None = None, cache_dir=None,
                    trust_torchscript: bool = False) -> dict:
    """Full open_clip weights from a local file, hub folder, ``hf-hub:`` id or (with ``model_name``) a pretrained
    tag; no file may run code. See :func:`leanclip.weights.load_pretrained`."""
    return weights.load_pretrained(model, source, model_name=model_name, cache_dir=cache_dir,
                                   trust_torchscript=trust_torchscript)
