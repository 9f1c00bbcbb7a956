"""The Hugging Face ``transformers`` boundary: CLIP and SigLIP models of ``transformers`` as a second model family.

Users name them ``transformers:<hub id>`` (``transformers:openai/clip-vit-base-patch16``) wherever a model name is
taken (``--model``, ``leanclip.weights.create_model``). The hub id IS the weights: they come from the Hugging Face
cache through ``transformers``' own ``from_pretrained`` (safetensors only, ``use_safetensors=True``: no pickle is
ever read), offline when ``HF_HUB_OFFLINE=1``; a separate ``pretrained`` source is refused.

Every ``transformers`` internal the engine touches lives here: the model classes, their module layout, the names of
the parameters the methods train (CLIPFit's text biases, LoRA's projections), the tokenizer and the image
preprocessing config, and the way back to a plain ``transformers`` model.

The wrapper :class:`TransformersCLIP` shows the engine what an open_clip model shows it:

- ``encode_image`` / ``encode_text`` (unnormalized embeddings; ``normalize=True`` as open_clip), ``forward`` returning
  open_clip's ``(image_features, text_features, logit_scale.exp()[, logit_bias])``;
- ``logit_scale`` (and ``logit_bias`` for SigLIP): the very parameters of the ``transformers`` model;
- ``visual`` (``image_size``, ``preprocess_cfg``, ``output_dim``) and ``text`` (``context_length``): the towers, so
  parameter names start with ``visual.`` / ``text.`` and every name-based method selection (LayerNorms, biases,
  the tower option) works unchanged.

The towers hold the ``transformers`` modules themselves (no copy): ``visual.model`` is the ``CLIPVisionModel`` /
``SiglipVisionModel``, ``visual.proj`` CLIP's ``visual_projection`` (SigLIP has none), ``text.model`` / ``text.proj``
likewise. The wrapped ``transformers`` model is kept outside the module tree (its parameters are the towers'), so
:func:`to_transformers` hands it back with whatever the methods changed in place.

Methods find their sites here (``linear_sites``, ``adapter_sites``, ``projection_modules``, ``CLIPFIT_TEXT_RE``,
the CoOp helpers, the layer ``lilt-deep`` appends: ``new_layer_like`` / ``append_layer``), and the lean encoder layer (``LeanEncoderLayer``: the recompute policies on ``CLIPEncoderLayer`` /
``SiglipEncoderLayer``; in ``leanclip.models.transformers_lean``, the other module that touches ``transformers``'
layers) is swapped in by ``leanclip.lean``. Not covered, each refused in one line naming the class: CoOp on SigLIP
(no start token), an encoder layer class other than CLIP's / SigLIP's (``prepare`` then keeps ``transformers``'
layers with a notice; ``lilt-deep`` refuses to append to it).
"""
from __future__ import annotations

import copy
import re

import torch
import torch.nn.functional as F
from torch import nn

from leanclip.geometry import TowerGeometry, elem_size, register_family

PREFIX = "transformers:"
# model_type of the config -> the transformers class that holds both towers
_CLASSES = {"clip": "CLIPModel", "siglip": "SiglipModel"}
# what preprocessing the model card's processor config does not say: the families' published statistics
_DEFAULT_NORM = {"clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
                 "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
# CLIPFit's text biases: the output bias of every text MLP (open_clip's ``mlp.c_proj.bias``)
CLIPFIT_TEXT_RE = re.compile(r"^text\.model\.encoder\.layers\.\d+\.mlp\.fc2\.bias$")
# LoRA targets (leanclip.methods.lora.TARGETS) -> the projection inside each encoder layer
LINEAR_SITES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "out": "self_attn.out_proj", "fc": "mlp.fc1", "proj": "mlp.fc2"}
# the encoder layers the engine knows (pre-LN: x + self_attn(layer_norm1(x)), then x + mlp(layer_norm2(x)))
LAYER_CLASSES = frozenset({"CLIPEncoderLayer", "SiglipEncoderLayer"})


def is_name(name) -> bool:
    """Whether ``name`` names a ``transformers`` model (``transformers:<hub id>``)."""
    return isinstance(name, str) and name.startswith(PREFIX)


def is_transformers(model) -> bool:
    return isinstance(model, TransformersCLIP)


def hub_id(name: str) -> str:
    """The hub id of ``transformers:<id>``; ValueError (one line) for an empty or path-like one."""
    model_id = name[len(PREFIX):].strip("/")
    if not model_id:
        raise ValueError(f"model {name!r}: empty hub id after {PREFIX!r}")
    if ".." in model_id.split("/") or model_id.startswith(("~", ".")):
        raise ValueError(f"model {name!r}: a Hugging Face hub id (org/name) is expected after {PREFIX!r}")
    return model_id


# ----------------------------------------------------------------------------------------------------------- towers
class Tower(nn.Module):
    """A ``transformers`` vision or text model and its projection (CLIP's ``visual_projection`` /
    ``text_projection``; SigLIP pools and projects inside each model). ``forward(x)`` gives the unnormalized
    embedding of images (``input_name="pixel_values"``) or token ids (``"input_ids"``, alone, as the models were
    trained: CLIP pools causally at the end-of-text token, so padding after it cannot reach it; SigLIP at the last
    position of its fixed-length padded sequence). ``attrs`` are what the engine reads of a tower (``image_size``,
    ``preprocess_cfg``, ``output_dim``; ``context_length``)."""

    def __init__(self, model: nn.Module, proj: nn.Module | None, input_name: str, **attrs):
        super().__init__()
        self.model = model
        self.proj = proj
        self.input_name = input_name
        for k, v in attrs.items():
            setattr(self, k, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.model(**{self.input_name: x}).pooler_output
        return self.proj(pooled) if self.proj is not None else pooled


class TransformersCLIP(nn.Module):
    """A ``transformers`` ``CLIPModel`` / ``SiglipModel`` seen as an open_clip model (module docstring)."""

    def __init__(self, hf_model: nn.Module, name: str, preprocess_cfg: dict):
        super().__init__()
        cfg = hf_model.config
        vis_cfg, txt_cfg = cfg.vision_config, cfg.text_config
        vproj = getattr(hf_model, "visual_projection", None)
        tproj = getattr(hf_model, "text_projection", None)
        width = vproj.out_features if vproj is not None else txt_cfg.projection_size
        self.visual = Tower(hf_model.vision_model, vproj, "pixel_values", image_size=int(vis_cfg.image_size),
                            preprocess_cfg=preprocess_cfg, output_dim=width)
        self.text = Tower(hf_model.text_model, tproj, "input_ids", context_length=int(txt_cfg.max_position_embeddings))
        self.logit_scale = hf_model.logit_scale
        self.logit_bias = getattr(hf_model, "logit_bias", None)
        self.family = cfg.model_type
        self.name = name
        object.__setattr__(self, "_hf", hf_model)  # outside the module tree: its parameters are the towers'

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        f = self.visual(image)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        f = self.text(text)
        return F.normalize(f, dim=-1) if normalize else f

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        img = self.encode_image(image, normalize=True) if image is not None else None
        txt = self.encode_text(text, normalize=True) if text is not None else None
        out = (img, txt, self.logit_scale.exp())
        return out + (self.logit_bias,) if self.logit_bias is not None else out

    def architecture_fingerprint(self) -> dict:
        """What the parameter shapes do not show of the architecture (``leanclip.checkpoint.architecture``): the
        ``transformers`` class and, per tower, the activation and LayerNorm eps."""
        cfg = self._hf.config
        return {"class": type(self._hf).__name__,
                **{f"{t}_{k}": getattr(getattr(cfg, f"{t}_config"), k, None)
                   for t in ("vision", "text") for k in ("hidden_act", "layer_norm_eps")}}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """open_clip's call for ``transformers``' own gradient checkpointing of both towers (non-reentrant, so
        frozen inputs and trainable LayerNorms inside a checkpoint get their gradients)."""
        if enable:
            self._hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self._hf.gradient_checkpointing_disable()

    def tower_class(self, tower: str) -> str:
        """How errors and notices name a tower: the ``transformers`` class it wraps."""
        m = self.visual.model if tower == "image" else self.text.model
        return f"{type(m).__module__}.{type(m).__qualname__}"


def tower_layers(model: TransformersCLIP, tower: str) -> list[tuple[str, nn.Module]]:
    """(name, encoder layer) of the image and / or text tower (``tower``: image, text or both), image first."""
    out = []
    for t, prefix, m in (("image", "visual.model", model.visual.model), ("text", "text.model", model.text.model)):
        if tower in (t, "both"):
            out += [(f"{prefix}.encoder.layers.{i}", layer) for i, layer in enumerate(m.encoder.layers)]
    return out


def linear_sites(model: TransformersCLIP, tower: str, targets) -> list[tuple[str, str, nn.Linear]]:
    """(target, name, ``nn.Linear``) of each LoRA target (``LINEAR_SITES``) in every encoder layer of ``tower``."""
    out = []
    for name, layer in tower_layers(model, tower):
        for t in targets:
            out.append((t, f"{name}.{LINEAR_SITES[t]}", layer.get_submodule(LINEAR_SITES[t])))
    return out


def projection_modules(model: TransformersCLIP, tower: str) -> list[tuple[str, nn.Module]]:
    """(prefix, module) of the projection into the joint space of ``tower`` (image / text / both): CLIP's
    ``visual_projection`` / ``text_projection``, SigLIP's text ``head`` (SigLIP's image tower ends in its attention-
    pooling head, which is no projection: none there)."""
    out = []
    for t, tw in (("image", model.visual), ("text", model.text)):
        if tower in (t, "both"):
            prefix = "visual" if t == "image" else "text"
            if tw.proj is not None:
                out.append((f"{prefix}.proj.", tw.proj))
            elif t == "text" and isinstance(getattr(tw.model, "head", None), nn.Linear):
                out.append((f"{prefix}.model.head.", tw.model.head))
    return out


def adapter_sites(model: TransformersCLIP, tower: str) -> list[tuple[str, nn.Module, int]]:
    """(name, module, width) where in-layer adapters go (Houlsby's placement: on each sub-layer's output before the
    residual add): the attention's ``out_proj`` and the MLP's ``fc2`` of every encoder layer of ``tower``."""
    out = []
    for name, layer in tower_layers(model, tower):
        for site in ("self_attn.out_proj", "mlp.fc2"):
            m = layer.get_submodule(site)
            out.append((f"{name}.{site}", m, m.out_features))
    return out


# ----------------------------------------------------------------------------------------------------------- lilt-deep
def _tower_model(model: TransformersCLIP, tower: str) -> nn.Module:
    return model.visual.model if tower == "image" else model.text.model


def _layer_class(layer: nn.Module | None) -> type | None:
    """The ``transformers`` class of an encoder layer (the lean swap's base class for a lean one)."""
    return None if layer is None else getattr(type(layer), "leanclip_base", type(layer))


def check_deep_tower(model: TransformersCLIP, tower: str) -> None:
    """ValueError naming the class unless the ``tower`` (image / text) ends in a CLIP / SigLIP encoder layer, the
    pre-LN layer ``new_layer_like`` makes the identity."""
    layers = list(_tower_model(model, tower).encoder.layers)
    cls = _layer_class(layers[-1] if layers else None)
    if cls is None or cls.__name__ not in LAYER_CLASSES:
        what = f"{cls.__module__}.{cls.__qualname__}" if cls is not None else "no encoder layer"
        raise ValueError(f"method 'lilt-deep' appends a CLIP / SigLIP encoder layer; the {tower} tower "
                         f"{model.tower_class(tower)} ends in {what}")


def new_layer_like(model: TransformersCLIP, tower: str, init: str) -> nn.Module:
    """A layer to append to the ``tower``'s encoder (``lilt-deep``): a copy of its last layer (``copy``) or one
    initialised as ``transformers`` initialises it (``random``: the model's own ``_init_weights`` applied to each
    module of the layer, children first, as ``initialize_weights`` does), made the identity so the tower computes
    exactly what it did: the layer is pre-LN, so with ``self_attn.out_proj`` and ``mlp.fc2`` zero (weights and
    biases) both branches add zero, and the gradient still reaches them at once (their inputs are non-zero). It is
    a copy in either case (then re-initialised), so it shares the tower's config object and keeps the forward hooks
    ``transformers`` records ``hidden_states`` with. ValueError naming the class (``check_deep_tower``)."""
    check_deep_tower(model, tower)
    tm = _tower_model(model, tower)
    new = copy.deepcopy(tm.encoder.layers[-1], memo={id(tm.config): tm.config})
    if init == "random":
        with torch.no_grad():
            new.apply(model._hf._init_weights)
    for lin in (new.self_attn.out_proj, new.mlp.fc2):
        nn.init.zeros_(lin.weight)
        if lin.bias is not None:
            nn.init.zeros_(lin.bias)
    return new


def append_layer(model: TransformersCLIP, tower: str, layer: nn.Module) -> None:
    """Append ``layer`` to the ``tower``'s ``encoder.layers`` (``visual.model.encoder.layers.<depth>``) and count it
    in the config (``sync_layer_counts``)."""
    _tower_model(model, tower).encoder.layers.append(layer)
    sync_layer_counts(model)


def sync_layer_counts(model: nn.Module) -> None:
    """Set ``num_hidden_layers`` of each tower config to its encoder's layer count, in every ``TransformersCLIP`` of
    ``model``: ``transformers`` reads it to resolve negative ``output_hidden_states`` indices (the hidden states are
    recorded per layer, so there are layers + 1) and ``save_pretrained`` writes it, so a layer ``lilt-deep`` appends
    or strips must be counted. The towers' configs are the model config's ``vision_config`` / ``text_config``."""
    for m in model.modules():
        if is_transformers(m):
            for tm in (m.visual.model, m.text.model):
                tm.config.num_hidden_layers = len(tm.encoder.layers)


# ----------------------------------------------------------------------------------------------------------- loading
def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_error(name: str, what: str, e: BaseException) -> ValueError:
    """One line naming ``name`` and what was being read, for a missing cache entry or a failed download."""
    where = " (HF_HUB_OFFLINE is set: it must be downloaded once on a machine with network)" if _offline() else ""
    return ValueError(f"model {name!r}: cannot read its {what} from the Hugging Face cache or hub{where}: "
                      f"{_one_line(e)}")


def _hub_call(name: str, what: str, call):
    """``call()`` (a ``from_pretrained``), its failure as :func:`_hub_error`."""
    try:
        return call()
    except (OSError, ValueError) as e:  # transformers raises OSError for what the cache / hub lacks
        raise _hub_error(name, what, e) from None


def _preprocess_cfg(name: str, model_id: str, family: str, image_size: int, cache_dir) -> dict:
    """mean / std / size of the model's image processor config; the family's published values when the repo has
    none (a model saved without its processor)."""
    from transformers import AutoImageProcessor

    mean, std = _DEFAULT_NORM[family]
    try:
        proc = AutoImageProcessor.from_pretrained(model_id, cache_dir=cache_dir)
    except (OSError, ValueError):
        proc = None
    if proc is not None and getattr(proc, "image_mean", None) and getattr(proc, "image_std", None):
        mean, std = tuple(float(v) for v in proc.image_mean), tuple(float(v) for v in proc.image_std)
    return {"size": (image_size, image_size), "mean": tuple(mean), "std": tuple(std), "interpolation": "bicubic",
            "resize_mode": "shortest"}


def create_model(name: str, pretrained=None, *, image_size: int | None = None, cache_dir=None) -> TransformersCLIP:
    """``transformers:<id>``: config and weights through ``transformers``' ``from_pretrained`` (safetensors only),
    wrapped in :class:`TransformersCLIP`. ``pretrained`` must be None (the id is the weights); ``image_size`` None
    or the model's own (``transformers`` models keep the resolution they were made at)."""
    import transformers

    model_id = hub_id(name)
    if pretrained is not None:
        raise ValueError(f"model {name!r} carries its own weights (the Hugging Face id is the weights); drop "
                         f"pretrained={pretrained!r}")
    config = _hub_call(name, "config", lambda: transformers.AutoConfig.from_pretrained(model_id, cache_dir=cache_dir))
    family = getattr(config, "model_type", None)
    if family not in _CLASSES:
        raise ValueError(f"model {name!r} is a {family!r} model ({type(config).__name__}); leanclip runs transformers "
                         f"models of type {', '.join(sorted(_CLASSES))}")
    size = int(config.vision_config.image_size)
    if image_size is not None and int(image_size) != size:
        raise ValueError(f"image_size={image_size}: model {name!r} runs at its own {size}x{size} (transformers "
                         f"models are not resized here)")
    cls = getattr(transformers, _CLASSES[family])
    try:
        hf = cls.from_pretrained(model_id, config=config, use_safetensors=True, cache_dir=cache_dir)
    except OSError as e:
        if "safetensors" in str(e):  # the repo has weights, but not as safetensors
            raise ValueError(f"model {name!r} has no safetensors weights (model.safetensors); leanclip never reads "
                             f"pickled weights (pytorch_model.bin): convert them to safetensors") from None
        raise _hub_error(name, "weights", e) from None
    hf.eval()
    return TransformersCLIP(hf, name, _preprocess_cfg(name, model_id, family, size, cache_dir))


# Configs of released models, for a model with random weights built offline (benchmarks: time and memory do not
# depend on the weights): the hub id -> (model_type, config arguments beside transformers' defaults).
RELEASED_CONFIGS = {"openai/clip-vit-base-patch16": ("clip", {"vision_config": {"patch_size": 16}}),
                    "openai/clip-vit-base-patch32": ("clip", {}),
                    "openai/clip-vit-large-patch14": ("clip", {
                        "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                                          "num_attention_heads": 16, "patch_size": 14},
                        "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
                        "projection_dim": 768})}


def random_config(name: str, *, cache_dir=None):
    """The config of ``transformers:<id>`` without a download: from the Hugging Face cache when it is there, else
    from ``RELEASED_CONFIGS``; ValueError (one line) for an id found in neither or of another model type."""
    import transformers

    model_id = hub_id(name)
    try:
        config = transformers.AutoConfig.from_pretrained(model_id, cache_dir=cache_dir, local_files_only=True)
    except (OSError, ValueError):
        if model_id not in RELEASED_CONFIGS:
            raise ValueError(f"model {name!r}: its config is not in the Hugging Face cache and leanclip knows no "
                             f"built-in config for it (known: {', '.join(sorted(RELEASED_CONFIGS))})") from None
        family, kw = RELEASED_CONFIGS[model_id]
        config = getattr(transformers, _CLASSES[family].replace("Model", "Config"))(**kw)
    family = getattr(config, "model_type", None)
    if family not in _CLASSES:
        raise ValueError(f"model {name!r} is a {family!r} model; leanclip runs transformers models of type "
                         f"{', '.join(sorted(_CLASSES))}")
    return config


def create_random(name: str, *, cache_dir=None) -> TransformersCLIP:
    """``transformers:<id>`` with random weights (``random_config``; no download, no weights read): for
    benchmarks, whose time and memory do not depend on the weights."""
    import transformers

    config = random_config(name, cache_dir=cache_dir)
    family = config.model_type
    hf = getattr(transformers, _CLASSES[family])(config).eval()
    size = int(config.vision_config.image_size)
    mean, std = _DEFAULT_NORM[family]
    return TransformersCLIP(hf, name, {"size": (size, size), "mean": mean, "std": std, "interpolation": "bicubic",
                                       "resize_mode": "shortest"})


class Tokenizer:
    """The model's ``transformers`` tokenizer as open_clip's are called: ``tok(texts) -> LongTensor (N, context)``,
    padded to the text tower's context (SigLIP was trained on that fixed length) and truncated to it."""

    def __init__(self, hf_tokenizer, context_length: int):
        self.tokenizer = hf_tokenizer
        self.context_length = context_length

    def __call__(self, texts, context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        enc = self.tokenizer(texts, padding="max_length", truncation=True,
                             max_length=context_length or self.context_length, return_tensors="pt")
        return enc["input_ids"].long()


def get_tokenizer(model: TransformersCLIP, cache_dir=None) -> Tokenizer:
    """The tokenizer of the hub repo ``model`` was read from."""
    from transformers import AutoTokenizer

    hf_tok = _hub_call(model.name, "tokenizer", lambda: AutoTokenizer.from_pretrained(hub_id(model.name),
                                                                                      cache_dir=cache_dir))
    return Tokenizer(hf_tok, model.text.context_length)


def to_transformers(model: TransformersCLIP) -> nn.Module:
    """The wrapped ``transformers`` model (its parameters are the wrapper's, so what a method trained is in it). A
    method that swapped module classes (LoRA) must be folded back first (``leanclip.merge``)."""
    if not is_transformers(model):
        raise TypeError(f"to_transformers needs a leanclip TransformersCLIP, got {type(model).__name__}")
    return model._hf


# ----------------------------------------------------------------------------------------------------------- CoOp
def token_embedding(model: TransformersCLIP) -> nn.Embedding:
    """The text tower's token embedding (where CoOp's learned context is spliced in)."""
    return model.text.model.embeddings.token_embedding


def coop_context(model: TransformersCLIP) -> int:
    """The text context a CoOp prompt fills. CoOp splices its context after the start token, which CLIP's tokenizer
    writes and SigLIP's does not: SigLIP is refused with one line naming the tower class."""
    if model.family != "clip":
        raise ValueError(f"method 'coop' splices its context after a start-of-text token, which the text tower "
                         f"{model.tower_class('text')} is not given")
    return model.text.context_length


def encode_text_embeddings(model: TransformersCLIP, tokens: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Text features of ``tokens`` with the token-embedding lookup replaced by ``embeddings`` (B, L, width): the
    lookup's output is swapped by a forward hook for this one call, so the rest is ``transformers``' own forward
    (positions, causal mask, end-of-text pooling, projection) and gradients reach ``embeddings``."""
    if embeddings.shape[:2] != tokens.shape:
        raise ValueError(f"prompt embeddings must have shape {tuple(tokens.shape)} + (width,), got "
                         f"{tuple(embeddings.shape)}")
    handle = token_embedding(model).register_forward_hook(lambda _m, _i, out: embeddings.to(out.dtype))
    try:
        return model.encode_text(tokens.to(embeddings.device))
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------------------------- estimates
# Activations an activation function keeps per element of its input: quick-GELU (x * sigmoid(1.702 x)) keeps x and
# the sigmoid; GELU and its tanh form keep x.
ACT_KEEPS = {"quick_gelu": 2.0}


def block_units(layer: nn.Module, policy: str) -> float:
    """Activation units (B*L*D elements) a lean encoder layer keeps for backward under ``policy`` when gradients
    flow through all of it. Without recompute: layer_norm1's input (1), q, k, v and the SDPA output (4: the
    projections' outputs are SDPA's inputs, frozen projections keep no input), layer_norm2's input (1) and the
    activation's input at ratio r = intermediate / hidden (quick-GELU keeps its sigmoid too: 2r). ``mlp`` keeps the
    attention part and the MLP checkpoint's input, ``mlp+qkv`` the layer input, the SDPA output and the MLP
    checkpoint's input, ``block`` the layer input."""
    if policy == "block":
        return 1.0
    if policy == "mlp+qkv":
        return 3.0
    if policy == "mlp":
        return 6.0
    cfg = layer.self_attn.config
    r = layer.mlp.fc1.out_features / layer.mlp.fc1.in_features
    return 6.0 + r * ACT_KEEPS.get(getattr(cfg, "hidden_act", "gelu"), 1.0)


def tower_geometry(model: nn.Module, tower: str, dtype, text_len) -> TowerGeometry | None:
    """The ``leanclip.geometry`` reader of a ``TransformersCLIP`` tower (None for other models): tokens (image:
    the embedding's positions; text: ``text_len`` or the context), width, MLP hidden width, heads, and SigLIP's
    attention-pooling image head (``map_head``)."""
    if not is_transformers(model):
        return None
    tm = _tower_model(model, tower)
    layers = list(tm.encoder.layers)
    if not layers:
        return None
    cfg = layers[0].self_attn.config
    if tower == "image":
        tokens = int(tm.embeddings.num_positions)
    else:
        tokens = int(text_len) if text_len is not None else model.text.context_length
    lead = layers[0]
    return TowerGeometry(tower, "transformers", tuple(layers), tokens, cfg.hidden_size, cfg.intermediate_size, False,
                         cfg.num_attention_heads, elem_size(dtype, lead.mlp.fc1.weight), False,
                         tower == "image" and getattr(tm, "head", None) is not None,
                         {p: block_units(lead, p) for p in ("none", "mlp", "mlp+qkv", "block")})


def _first_grad_layer(names: list[str], prefix: str, depth: int, embeds: tuple) -> int | None:
    """The first encoder layer gradients flow through: 0 when the embeddings (or the pre-LayerNorm) train, else the
    first layer holding a trainable parameter; None when no layer does."""
    if any(n.startswith(tuple(prefix + e for e in embeds)) for n in names):
        return 0
    return next((i for i in range(depth) if any(n.startswith(f"{prefix}encoder.layers.{i}.") for n in names)), None)


def _tower_saved(model: TransformersCLIP, tower: str, policy: str, batch: int, text_len, dtype) -> int:
    """Bytes one tower keeps for backward: ``block_units`` per layer from the first one gradients flow through (an
    upper bound when they enter it midway) with the LayerNorm statistics and SDPA's logsumexp, then the final
    LayerNorm's input (CLIP's image tower normalizes the pooled row only) and SigLIP's pooling head's keys and
    values, and the fp32-normalized features."""
    g = tower_geometry(model, tower, dtype, text_len)
    top = "visual." if tower == "image" else "text."
    prefix = top + "model."
    names = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith(top)]
    if g is None or batch == 0 or not names:
        return 0
    first = _first_grad_layer(names, prefix, g.depth, ("embeddings.", "pre_layrnorm."))
    rows, unit = batch * g.tokens, g.unit(batch)
    total = sum(g.units[policy] * unit + rows * (2 * 8 + g.heads * 4) for _ in g.blocks[first or 0:]) \
        if first is not None else 0.0
    if any(n.startswith(prefix + "pre_layrnorm.") for n in names):  # CLIP's pre-LayerNorm keeps its input
        total += rows * (g.width * g.elem + 8)
    pooled_norm = tower == "image" and model.family == "clip"
    total += (batch if pooled_norm else rows) * (g.width * g.elem + 8)
    if g.map_head:
        total += 2 * unit
    return int(total + batch * (model.visual.output_dim * 4 + 8))


def estimate_saved_bytes(model: TransformersCLIP, policy: str, batch: int, text_batch: int, text_len, dtype) -> int:
    """``leanclip.saved_bytes.estimate_saved_bytes`` for a ``TransformersCLIP``: both towers (text at ``text_len`` tokens,
    default its whole context: an upper bound where the lean CLIP text tower cuts it after the last end of text)."""
    return (_tower_saved(model, "image", policy, batch, None, dtype)
            + _tower_saved(model, "text", policy, text_batch, text_len, dtype))


register_family(tower_geometry)
