"""PEFT methods on open_clip CLIP models: ``prepare(model, method, **opts)`` (in place).

``prepare`` validates everything first (method names, options, each method's check, the towers, the ``init_from``
file, whether the lean modules cover the model), then freezes every parameter, optionally loads a trainable-only
checkpoint (``init_from``, "LN as initialization"), lets the method unlock parameters / add modules, swaps in the
lean modules (``leanclip.lean``), optionally keeps frozen weights in bf16, and records ``model.leanclip_info``. An error
after the model was touched (e.g. no recompute policy fits the budget) restores it exactly.

Towers: ViT towers of open_clip, timm transformer towers (SigLIP / SigLIP2, EVA02, PE-Core) and Hugging Face BERT /
RoBERTa / XLM-RoBERTa text towers get the lean modules, each tower on its own. Other towers (ConvNeXt and other
convolutional timm trunks, ModifiedResNet, mT5 text encoders) get every method that is defined on them with their
plain modules (``lean=None`` makes the other tower lean and names the class that stays plain in a one-line notice);
a method that is not defined on a tower (``clipfit`` without image LayerNorms or text ``mlp.c_proj.bias``, ``coop``
without open_clip token embeddings, ``lilt-adapter`` without LayerNorms in the blocks, ``ln`` on a tower without
LayerNorms) is a ValueError naming the tower class.

Method registry
---------------
``METHODS`` maps a name to ``fn(model, **opts) -> dict[str, nn.Module]``. ``fn`` unlocks existing parameters
(``requires_grad_(True)``) and returns the modules to add; ``prepare`` attaches each as ``model.<name>`` (their
parameters are trainable unless ``fn`` froze some). The options a method accepts are its keyword parameters
(``tower``, ``classnames`` and ``tokenizer`` are passed to methods that declare them); anything else is a ValueError.
``METHOD_CHECKS`` holds an optional ``check(model, **opts)`` per method that validates option values and the towers
without changing anything. Adding a method is one registration::

    @register_method("lilt-ln", check=_check_lilt_ln)
    def _lilt_ln(model, tower="both"):
        _unlock(model, ..., tower)
        return {}

Combinations are written ``a+b`` (e.g. ``ln+coop``): the components are applied in order and trained together.
"""
from __future__ import annotations

import copy
import inspect
import json
from typing import Callable, Iterable

import torch
from torch import nn

# the method modules register themselves on import; they depend on the registry and the selection, not on this module
from leanclip.methods import compacter, houlsby, lilt, lora  # noqa: F401
from leanclip.methods import cocoop, prograd  # noqa: F401
from leanclip import budget as _budget
from leanclip import heads as _heads
from leanclip import lean as _lean
from leanclip import utils
from leanclip.configs import register_tiny_config  # noqa: F401  (re-exported for convenience)
from leanclip.features import check_classnames, clipfit_kd_loss, frozen_text_features
from leanclip.models import transformers as _hf
from leanclip.models.openclip import class_name, hf_text_tower, text_tower
# the registry and the parameter selection, re-exported: ``from leanclip.methods import register_method`` keeps working
from leanclip.registry import (  # noqa: F401
    METHOD_CHECKS, METHOD_TRAITS, METHODS, TASKS, TRAINERS, MethodTraits, OptionRange, check_option_ranges,
    check_task, is_closed_set,
    method_contrastive_defaults, method_hooks, method_loss_terms, method_options, method_template_set,
    method_train_defaults, method_trainer, parse_method, register_method, set_method_check,
)
from leanclip.select import (  # noqa: F401
    BIAS_RE, CLIPFIT_TEXT_RE, IMAGE_RE, TEXT_RE, TOWERS, check_coverage, check_tower, count_trainable, embed_dim,
    in_tower, layernorm_names, model_device, names_matching, notice, require_open_clip_tower, require_options, tower_class,
    tower_of, trainable_parameters, unlock, unlock_layernorms, unlock_names,
)

# Options handled by prepare itself (not passed to method functions).
PREPARE_OPTIONS = ("lean", "recompute", "recompute_chunk", "memory_budget", "tower", "classnames", "tokenizer", "init_from",
                   "frozen_dtype", "model_name", "batch_size", "text_batch_size", "text_len")
_CONTEXT_ARGS = ("tower", "classnames", "tokenizer")


def version() -> str:
    try:
        import leanclip
        return str(leanclip.__version__)
    except Exception:  # pragma: no cover
        return "0.1.0"


# ----------------------------------------------------------------------------------------------------------- checks
# Each runs before prepare changes anything: option values and what the method needs of the towers.
def _check_ln(model, tower="both", **_):
    return check_coverage(model, "ln", layernorm_names(model, check_tower(tower)), tower, "LayerNorms")


def _check_bitfit(model, tower="both", **_):
    return check_coverage(model, "bitfit", names_matching(model, BIAS_RE, check_tower(tower)), tower, "biases")


def _check_clipfit(model, text_bias=True, image_ln=True, l2_reg=0.0, **_):
    for name, v in (("text_bias", text_bias), ("image_ln", image_ln)):
        if not isinstance(v, bool):
            raise ValueError(f"method 'clipfit': {name} must be true or false, got {v!r}")
    if not (text_bias or image_ln):
        raise ValueError("method 'clipfit': text_bias=false and image_ln=false leave nothing to train")
    if isinstance(l2_reg, bool) or not isinstance(l2_reg, (int, float)) or not 0 <= l2_reg < float("inf"):
        raise ValueError(f"method 'clipfit': l2_reg must be a finite number >= 0, got {l2_reg!r}")
    if image_ln and not layernorm_names(model, "image"):
        raise ValueError(f"method 'clipfit' trains the image tower's LayerNorms, and the image tower "
                         f"{tower_class(model, 'image')} has none")
    if text_bias and not names_matching(model, CLIPFIT_TEXT_RE, "text"):
        raise ValueError(f"method 'clipfit' trains the text tower's transformer.resblocks.*.mlp.c_proj.bias, and the "
                         f"text tower {tower_class(model, 'text')} has none")


def _check_llu(model, beta=0.5, gamma=20.0, gate="exp", threshold=0.1, init="identity", reg="mse", shared=False,
               init_seed=0, blend="normalized", **_):
    _heads.check_llu_options(beta, gamma, gate, threshold, init, reg, init_seed, blend)
    if not isinstance(shared, bool):
        raise ValueError(f"shared must be true or false, got {shared!r}")
    embed_dim(model)


def _probe_classes(classnames, num_classes) -> int:
    """The number of classes of a linear probe: len(classnames) (num_classes must agree) or num_classes."""
    if classnames is not None:
        classnames = list(classnames)
        if not classnames:
            raise ValueError("classnames must not be empty")
        if num_classes is not None and num_classes != len(classnames):
            raise ValueError(f"num_classes={num_classes} but {len(classnames)} classnames were given")
        c = len(classnames)
    elif num_classes is not None:
        c = num_classes
    else:
        raise ValueError("method 'linear-probe' needs classnames or num_classes")
    if isinstance(c, bool) or not isinstance(c, int) or c < 1:
        raise ValueError(f"num_classes must be a positive int, got {c!r}")
    return c


def _check_linear_probe(model, classnames=None, tokenizer=None, num_classes=None, templates=None, **_):
    from leanclip.features import _check_templates

    _probe_classes(classnames, num_classes)
    _check_templates(templates or ["a photo of a {}."])
    embed_dim(model)


COOP_INIT_TEXT = "a photo of a"  # CoOp's initialisation for its 4-token context
COOP_STD = 0.02  # CoOp's random initialisation, N(0, 0.02^2): the scale of CLIP's token embeddings
# n_ctx: the check holds it to the text tower's context, which a model config bounds (leanclip.models.openclip_config);
# std: a random start beyond 1 is 50x the scale of the token embeddings the context sits among
COOP_RANGES = {"n_ctx": OptionRange(int, 1, 4096), "std": OptionRange(float, 0.0, 1.0, lo_open=True)}


def _coop_init_text(n_ctx: int, init_text) -> str:
    """The text the context starts from ("" = a random start): ``init_text`` as given, else CoOp's rule - "a photo
    of a" for its 4-token context, a random start for any other length."""
    if init_text is not None:
        return init_text
    return COOP_INIT_TEXT if n_ctx == len(COOP_INIT_TEXT.split()) else ""


def _init_text_tokens(tokenizer, text: str) -> tuple[torch.Tensor, int, bool]:
    """(token ids (1, L), how many tokens lie between [SOS] and [EOT], whether [EOT] sits in the last slot: the
    tokenizer cuts a longer text there)."""
    tok = torch.as_tensor(tokenizer([text]))
    eot = int(tok[0].argmax())
    return tok, eot - 1, eot == tok.shape[1] - 1


def _check_coop(model, classnames=None, tokenizer=None, n_ctx=4, init_text=None, std=None, **_):
    check_prompt_options(model, "coop", classnames, tokenizer, n_ctx, init_text, std)


def check_prompt_options(model, method: str, classnames, tokenizer, n_ctx: int, init_text, std,
                         align_right: bool = False) -> None:
    """The checks of a CoOp-style learned context (``coop``, and ``method``s built on it: ``cocoop``, ``prograd``):
    class names and tokenizer given, room for the context in the text tower, an ``init_text`` of exactly ``n_ctx``
    tokens (``align_right``: of at most ``n_ctx`` tokens, which start the last context vectors; ProGrad's rule)."""
    require_options(method, classnames=classnames, tokenizer=tokenizer)
    if init_text is not None and not isinstance(init_text, str):
        raise ValueError(f"init_text must be a string or None, got {type(init_text).__name__}")
    if _hf.is_transformers(model):
        context = _hf.coop_context(model)
    else:
        require_open_clip_tower(model, method, "text", "token embeddings to splice the learned context into")
        context = text_tower(model).positional_embedding.shape[0]
    if n_ctx > context - 3:  # [SOS] ctx_1..ctx_n, at least one class-name token, [EOT]
        raise ValueError(f"n_ctx={n_ctx} leaves no room for a class name in the text tower's {context}-token "
                         f"context (at most {context - 3})")
    text = _coop_init_text(n_ctx, init_text)
    if not text:
        return
    if std is not None:
        raise ValueError(f"std={std} has no effect: the context starts from the token embeddings of init_text "
                         f"{text!r} (init_text= empty for a random start with std)")
    _, count, cut = _init_text_tokens(tokenizer, text)
    if align_right and count <= n_ctx and not cut:
        return
    if count != n_ctx:  # it would be ignored: say so rather than start from random vectors unasked
        shown = text if len(text) <= 40 else text[:37] + "..."
        size = f"longer than the tokenizer's {count + 2}-token context" if cut else f"{count} tokens"
        instead = f"an init_text of {n_ctx} tokens" + ("" if cut else f", n_ctx={count}")
        rule = "at most" if align_right else "exactly"
        raise ValueError(f"init_text {shown!r} is {size}, n_ctx={n_ctx}: the context starts from init_text only "
                         f"when it has {rule} n_ctx tokens (give {instead}, or init_text= empty for a random start)")


def _check_adapter(model, reduction=4, ratio=0.2, **_):
    _heads.check_adapter_options(embed_dim(model), reduction, ratio)


# ----------------------------------------------------------------------------------------------------------- methods
@register_method("ln", check=_check_ln, traits=MethodTraits(mergeable=True))
def _ln(model, tower="both"):
    """Every LayerNorm weight+bias (ln_pre, ln_1, ln_2, ln_post, ln_final) of ``tower``."""
    unlock_layernorms(model, check_tower(tower))
    return {}


@register_method("bitfit", check=_check_bitfit, traits=MethodTraits(mergeable=True))
def _bitfit(model, tower="both"):
    """Every bias of ``tower``, incl. ``attn.in_proj_bias`` and the LayerNorm biases."""
    unlock(model, BIAS_RE, check_tower(tower))
    return {}


def _clipfit_distillation(ctx):
    """CLIPFit's loss term ``kd_lambda * (1 - mean_k cos(t_k, t0_k))``, t0 the zero-shot class text features of the
    weights the run starts from (constant: computed once)."""
    lam = getattr(ctx.cfg, "kd_lambda", 8.0)
    if not lam:
        return None
    with torch.no_grad(), utils.autocast(ctx.device, ctx.precision):
        teacher = frozen_text_features(ctx.model, ctx.classnames, ctx.templates, ctx.tokenizer).detach().float()
    return lambda txt: ("kd", clipfit_kd_loss(txt, teacher, lam))


def _clipfit_l2(ctx):
    """CLIPFit's second regulariser: ``l2_reg * sum_g mean_{t in g} ||t - t0||^2`` over its three parameter groups
    (text ``c_proj`` biases, image LayerNorm biases, image LayerNorm weights), t0 the values the run starts from."""
    lam = float((ctx.model.leanclip_info.get("options") or {}).get("l2_reg", 0.0))
    if not lam:
        return None
    groups: dict[str, list] = {}
    image_ln = set(layernorm_names(ctx.model, "image"))
    for name, p in ctx.model.named_parameters():
        if p.requires_grad and (CLIPFIT_TEXT_RE.search(name) or name in image_ln):
            key = "text_bias" if CLIPFIT_TEXT_RE.search(name) else f"image_ln_{name.rsplit('.', 1)[-1]}"
            groups.setdefault(key, []).append((p, p.detach().clone()))

    def term(txt):
        total = sum(torch.stack([(p.float() - p0.float()).pow(2).sum() for p, p0 in g]).mean()
                    for g in groups.values())
        return "l2", lam * total
    return term


# l2_reg weighs a sum of squared parameter shifts against a cross-entropy of order 1
@register_method("clipfit", check=_check_clipfit, ranges={"l2_reg": OptionRange(float, 0.0, 1e6)},
                 traits=MethodTraits(loss_terms=(_clipfit_distillation, _clipfit_l2), template_set="clipfit",
                                     mergeable=True))
def _clipfit(model, text_bias=True, image_ln=True, l2_reg=0.0):
    """Text ``transformer.resblocks.*.mlp.c_proj.bias`` (``text_bias``) + every image LayerNorm (ln_pre, ln_1, ln_2,
    ln_post; ``image_ln``): either alone is the paper's ablation. On a timm image tower (SigLIP / SigLIP2, EVA02,
    PE-Core: open_clip ``CustomTextCLIP``) CLIPFit's parts map to: the text tower is open_clip's own, so its
    ``mlp.c_proj.bias`` stays; the image LayerNorms are every LayerNorm of the timm tower - ``norm_pre``, each block's
    ``norm1`` / ``norm2``, EVA's sub-LNs ``attn.norm`` / ``mlp.norm``, q/k norms where present, the final ``norm`` /
    ``fc_norm`` and the MAP head's ``attn_pool.norm``. ``l2_reg``: weight of the L2 penalty on each
    trainable group's distance from its starting values (0 = off, the paper's default recipe)."""
    if text_bias:
        unlock(model, CLIPFIT_TEXT_RE, "text")
    if image_ln:
        unlock_layernorms(model, "image")
    return {}


@register_method("full", traits=MethodTraits(alone=True, contrastive_defaults={"lr": 1e-4}, mergeable=True))
def _full(model):
    """Every parameter (the baseline)."""
    for p in model.parameters():
        p.requires_grad_(True)
    return {}


# gamma: see heads.LLU_GAMMA_MAX; init_seed: numpy's seed range, as --seed
LLU_RANGES = {"beta": OptionRange(float, 0.0, 1.0), "gamma": OptionRange(float, 0.0, _heads.LLU_GAMMA_MAX),
              "threshold": OptionRange(float, 0.0, 2.0), "init_seed": OptionRange(int, 0, 2 ** 32 - 1)}


@register_method("llu", check=_check_llu, ranges=LLU_RANGES, traits=MethodTraits(
    trainer="cached", tasks=("classify",), alone=True, hooks={"image_logit": "llu_image", "text_logit": "llu_text"},
    train_defaults={"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, "batch_size": 256, "warmup_epochs": 0}))
def _llu(model, beta=0.5, gamma=20.0, gate="exp", threshold=0.1, init="identity", reg="mse", shared=False,
         init_seed=0, blend="normalized"):
    """Encoders frozen; identity-initialised affine maps on the image and text embeddings (``heads.LLUHead``).
    Ablations (``heads.LLUHead``): ``gate`` exp | dirac (alpha = 1 iff cosine distance <= ``threshold``) | none;
    ``init`` identity | random (seeded by ``init_seed``); ``shared``: one map for both towers (g_I = g_T);
    ``reg`` mse (the authors' code, default) | norm (the paper's ||W - I|| + ||b||); ``blend`` normalized (default)
    | paper (eq. 4: g(x) blended without normalizing it first)."""
    e = embed_dim(model)
    g = torch.Generator().manual_seed(init_seed)
    kw = dict(gate=gate, threshold=threshold, init=init, reg=reg, blend=blend, generator=g)
    img = _heads.LLUHead(e, beta, gamma, **kw)
    txt = _heads.LLUHead(e, beta, gamma, **kw)
    return {"llu_image": img, "llu_text": txt.tie_to(img) if shared else txt}


@register_method("linear-probe", check=_check_linear_probe, ranges={"num_classes": OptionRange(int, 1, 10 ** 6)},
                 traits=MethodTraits(tasks=("classify",), closed_set=True, hooks={"logits": "linear_probe"},
                                     train_defaults={"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0,
                                                     "warmup_epochs": 0}))
def _linear_probe(model, classnames=None, tokenizer=None, num_classes=None, templates=None):
    """Linear head E -> C on normalized image features, initialised from the zero-shot class text weights
    (``logit_scale.exp() * text_features``, and a SigLIP model's ``logit_bias`` as its bias, so it starts at the
    zero-shot logits) when classnames and tokenizer are given, else zeros. C = len(classnames) or ``num_classes``."""
    c = _probe_classes(classnames, num_classes)
    weight = None
    if classnames is not None and tokenizer is not None:
        zs = frozen_text_features(model, list(classnames), templates or ["a photo of a {}."], tokenizer)
        weight = (model.logit_scale.detach().float().exp() * zs.float()).cpu()
    head = _heads.LinearProbe(embed_dim(model), c, weight=weight)
    bias = getattr(model, "logit_bias", None)
    if weight is not None and isinstance(bias, torch.Tensor):  # SigLIP's logits: scale * cos + logit_bias
        with torch.no_grad():
            head.fc.bias.fill_(float(bias))
    dev = model_device(model)
    return {"linear_probe": head.to(dev)}


@register_method("coop", check=_check_coop, ranges=COOP_RANGES,
                 traits=MethodTraits(tasks=("classify",), hooks={"prompts": "prompt_learner"}))
def _coop(model, classnames=None, tokenizer=None, n_ctx=4, init_text=None, std=None):
    """CoOp learned prompt context: n_ctx vectors, class names appended. They start from the token embeddings of
    ``init_text``, which must have exactly n_ctx tokens, or from N(0, std^2) (``std`` default 0.02) when
    ``init_text`` is empty; unset, CoOp's rule applies: "a photo of a" for n_ctx=4, a random start otherwise. An
    option that would have no effect (an init_text of another length, a std beside an init_text) is refused. Needs
    classnames, a tokenizer and an open_clip transformer text tower (``_check_coop``, which ``prepare`` runs first)."""
    embedding, init = prompt_init(model, tokenizer, n_ctx, init_text)
    learner = _heads.PromptLearner(n_ctx, embedding.weight.shape[1], init_embeddings=init,
                                   std=COOP_STD if std is None else std)
    learner.classnames = list(classnames)
    return {"prompt_learner": learner.to(embedding.weight.device)}


def prompt_init(model, tokenizer, n_ctx: int, init_text) -> tuple[nn.Embedding, torch.Tensor | None]:
    """(the text tower's token embedding, the context's starting vectors (n_ctx, width) or None for a random start)
    under CoOp's rule (``_coop_init_text``): the token embeddings of the init text. An init text of k < n_ctx tokens
    (which ``check_prompt_options`` admits with ``align_right``: ProGrad's rule) starts the last k vectors, the
    others start at zero."""
    embedding = _hf.token_embedding(model) if _hf.is_transformers(model) else text_tower(model).token_embedding
    text = _coop_init_text(n_ctx, init_text)
    if not text:
        return embedding, None
    tok, count, _ = _init_text_tokens(tokenizer, text)
    with torch.no_grad():
        vectors = embedding(tok.to(embedding.weight.device))[0, 1:1 + count].float().cpu()
    init = torch.zeros(n_ctx, vectors.shape[1])
    init[n_ctx - count:] = vectors
    return embedding, init


@register_method("adapter", check=_check_adapter, traits=MethodTraits(hooks={"image_features": "clip_adapter"}),
                 ranges={"reduction": houlsby.REDUCTION_RANGE, "ratio": OptionRange(float, 0.0, 1.0)})
def _adapter(model, reduction=4, ratio=0.2):
    """CLIP-Adapter: residual bottleneck MLP E -> E/reduction -> E (ReLU) on image features, mixed with ``ratio``."""
    e = embed_dim(model)
    dev = model_device(model)
    return {"clip_adapter": _heads.ClipAdapter(e, reduction, ratio).to(dev)}


# ----------------------------------------------------------------------------------------------------------- prepare
def _accepts_any(name: str) -> bool:
    return any(v.kind == v.VAR_KEYWORD for v in inspect.signature(METHODS[name]).parameters.values())


def _split_options(parts: list[str], method: str, opts: dict, context: dict) -> list[dict]:
    per = []
    used = set()
    for p in parts:
        accepted = method_options(p)
        kw = {}
        for k, v in opts.items():
            if k in accepted or _accepts_any(p):
                kw[k] = v
                used.add(k)
        for k, v in context.items():
            if k in accepted or _accepts_any(p):
                kw[k] = v
                used.add(k)
        per.append(kw)
    unknown = sorted(set(opts) - used)
    if unknown:
        valid = sorted(set(PREPARE_OPTIONS) | {k for p in parts for k in method_options(p)})
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; valid options: {valid}")
    if context.get("tower", "both") != "both" and "tower" not in used:
        raise ValueError(f"tower={context['tower']!r} has no effect on method {method!r} (only methods with a "
                         f"tower option: {sorted(n for n in METHODS if 'tower' in method_options(n))})")
    return per


def _check_supported(model: nn.Module) -> None:
    """Any open_clip CLIP-style model: an image tower ``model.visual`` and a text tower (open_clip's transformer,
    flattened in CLIP or ``model.text`` in CustomTextCLIP / CoCa, or another module such as a Hugging Face encoder).
    Which methods and whether the lean modules apply depend on the towers (method checks, ``_choose_lean``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an open_clip model (nn.Module), got {type(model).__name__}")
    has_text = text_tower(model) is not None or isinstance(getattr(model, "text", None), nn.Module)
    if not isinstance(getattr(model, "visual", None), nn.Module) or not has_text:
        raise ValueError(f"leanclip prepares open_clip CLIP models (an image tower model.visual and a text tower); "
                         f"got {class_name(model)}")


def _check_recompute_args(lean, recompute, memory_budget, batch_size, recompute_chunk=None) -> None:
    if lean is not None and not isinstance(lean, bool):
        raise ValueError(f"lean must be True, False or None (automatic), got {lean!r}")
    _lean.check_policy(recompute, allow_auto=True)
    _lean.check_chunk(recompute, recompute_chunk)
    if memory_budget is not None:
        if recompute != "auto":
            raise ValueError(f"memory_budget is only used with recompute='auto' (got recompute={recompute!r})")
        _budget.resolve_budget(memory_budget, 1)  # its form; a fraction is resolved against plain's peak later
    if recompute == "auto":
        if memory_budget is None:
            raise ValueError("recompute='auto' needs memory_budget= (a step peak: bytes, '12GiB', or a fraction of "
                             "plain's)")
        if batch_size is None:
            raise ValueError("recompute='auto' needs batch_size= (images per step) to predict the step's peak")
    if lean is False and recompute != "none":
        raise ValueError(f"recompute={recompute!r} needs lean=True (the plain model keeps what eager PyTorch keeps)")


FROZEN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what frozen weights may be kept in


def _check_frozen_dtype(frozen_dtype, lean) -> None:
    if frozen_dtype is None:
        return
    if frozen_dtype not in FROZEN_DTYPES:
        raise ValueError(f"frozen_dtype must be torch.bfloat16, torch.float16, torch.float32 or None, "
                         f"got {frozen_dtype!r}")
    if lean is False:
        raise ValueError("frozen_dtype needs lean=True (open_clip's plain modules cannot mix dtypes)")


def _choose_lean(model: nn.Module, lean: bool | None, recompute: str, frozen_dtype) -> tuple[bool, list[str], list | None]:
    """(whether prepare swaps in the lean modules, notices, the towers to swap: None for the whole model).

    ``lean=None`` (automatic) makes every covered tower lean: when one tower is not covered (a ConvNeXt or
    ModifiedResNet image tower, a Hugging Face text tower), the other tower still goes lean and a one-line notice
    names the class that stays on its own modules (``leanclip.lean.tower_obstacles``); with neither covered the
    model keeps its plain modules, with a notice. ``lean=True`` needs the whole model covered, and ``frozen_dtype``
    too (a plain tower cannot mix dtypes); a recompute policy applies to the lean towers. Otherwise a ValueError
    naming what is not covered."""
    if lean is False:
        return False, [], None
    obstacles = _lean.lean_obstacles(model)
    if frozen_dtype is not None and _hf.is_transformers(model):  # its attention and LayerNorms are transformers'
        raise ValueError(f"frozen_dtype: the frozen weights of {model.name} stay in their dtype (transformers' own "
                         f"attention and LayerNorms run them); use --precision bf16 autocast instead")
    if hf_text_tower(model) is not None and (frozen_dtype is not None or recompute == "auto"):
        what = "frozen_dtype" if frozen_dtype is not None else "recompute='auto'"
        raise ValueError(f"{what} does not cover the text tower {tower_class(model, 'text')} (transformers' own "
                         f"embeddings and attention run its frozen weights, and the memory planner has no estimate "
                         f"of its layers): give a recompute policy and no frozen_dtype")
    if not obstacles:
        return True, [], None
    why = "; ".join(obstacles)
    if lean is True:
        raise ValueError(f"lean=True: the lean modules do not cover this model: {why} (pass lean=False, or leave lean "
                         f"unset to fall back to open_clip's modules)")
    if frozen_dtype is not None:
        raise ValueError(f"frozen_dtype needs the lean modules, which do not cover this model: {why}")
    towers = _lean.covered_towers(model) if hasattr(model, "visual") else []
    if towers:
        return True, [f"lean on the {' and '.join(towers)} tower only: {why} (it keeps its own modules)"], towers
    if recompute != "none":
        raise ValueError(f"recompute={recompute!r} needs the lean modules, which do not cover this model: {why}")
    return False, [f"lean=False for {class_name(model)}: {why}"], None


def _plan_for_budget(model: nn.Module, memory_budget, batch_size: int, sizes: dict,
                     towers=None) -> "_budget.RecomputePlan":
    """Swap in the lean modules under the recompute plan that fits ``memory_budget`` (a step peak: bytes, or a
    fraction of plain open_clip's predicted peak, taken before the swap) at the least recompute work; says the
    plan in one line."""
    plain = _budget.plain_peak(model, batch_size, **sizes)
    limit = _budget.resolve_budget(memory_budget, plain)
    _lean.apply_lean(model, "none", towers=towers)
    plan = _budget.plan_recompute(model, limit, batch_size, **sizes)
    _budget.apply_plan(model, plan)
    plan.notes.update(budget_bytes=limit, plain_peak_bytes=plain)
    notice(f"memory budget {_budget._mib(limit)} (plain's predicted step peak {_budget._mib(plain)}): "
           f"recompute {plan.describe()}, predicted step peak {_budget._mib(plan.peak)}")
    return plan


def _check_methods(model: nn.Module, parts: list[str], per_opts: list[dict]) -> list[str]:
    """Run every component's check; returns their notices."""
    notices = []
    for p, kw in zip(parts, per_opts):
        check_option_ranges(p, kw)  # declared with the method: before its check reads any of them
        check = METHOD_CHECKS.get(p)
        if check is not None:
            notices += check(model, **{**method_options(p), **kw}) or []
    return notices


def _init_from_names(model: nn.Module, path) -> list[str]:
    """Validate a trainable-only checkpoint for ``init_from`` against ``model`` as prepare will see it (without the
    modules a previous prepare added), copying nothing. Returns the parameter names it holds."""
    from leanclip.checkpoint import check_init_from

    added = (getattr(model, "leanclip_info", None) or {}).get("modules", [])
    return check_init_from(model, path, skip_modules=added)


class _ModelState:
    """What ``prepare`` may change, recorded so that a failure midway puts the model back exactly: per module its
    class (lean swaps), attribute dict (``leanclip_info``, recompute policy, hook handles) and the contents of its
    dict/set attributes (parameters, buffers, submodules - added or removed ones -, hooks); per parameter its tensor
    (a ``frozen_dtype`` cast replaces ``.data``) and ``requires_grad``; copies of the values ``init_from``
    overwrites in place. Only the init_from values are copied: the rest is references (no second model in memory)."""

    def __init__(self, model: nn.Module, overwritten: Iterable[str] = ()):
        self.modules = [(m, type(m), dict(m.__dict__),
                         {k: copy.copy(v) for k, v in m.__dict__.items() if isinstance(v, (dict, set))})
                        for m in model.modules()]
        self.params = [(p, p.data, p.requires_grad) for p in model.parameters()]
        self.values = [(p, p.detach().clone()) for p in map(model.get_parameter, overwritten)]

    def restore(self) -> None:
        for m, cls, attrs, containers in self.modules:
            m.__class__ = cls
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for k, saved in containers.items():
                attrs[k].clear()
                attrs[k].update(saved)
        for p, data, flag in self.params:
            p.data = data
            p.requires_grad_(flag)
        with torch.no_grad():
            for p, v in self.values:
                p.copy_(v)


def _jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return f"<{type(v).__name__}>"


def _remove_added(model: nn.Module) -> None:
    info = getattr(model, "leanclip_info", None) or {}
    for name in info.get("modules", []):
        if name in model._modules:
            del model._modules[name]


def _cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    for name, p in model.named_parameters():
        if not p.requires_grad and p.is_floating_point() and tower_of(name) is not None and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _apply_methods(model: nn.Module, parts: list[str], per_opts: list[dict], init_from) -> dict[str, nn.Module]:
    """Freeze everything (dropping what a previous prepare added), load ``init_from``, apply the components."""
    _remove_added(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if init_from is not None:  # LN-as-initialization
        from leanclip.checkpoint import load_into

        load_into(model, init_from)
    added: dict[str, nn.Module] = {}
    for p, kw in zip(parts, per_opts):
        mods = METHODS[p](model, **kw) or {}
        for name, mod in mods.items():
            if not isinstance(mod, nn.Module):
                raise TypeError(f"method {p!r} returned a non-module for {name!r}")
            if name in added or (hasattr(model, name) and name not in model._modules):
                raise ValueError(f"method {p!r} would overwrite model attribute {name!r}")
            model.add_module(name, mod)
            added[name] = mod
    return added


def prepare(model: nn.Module, method: str, *, lean: bool | None = None, recompute: str = "none",
            recompute_chunk: int | None = None, memory_budget: int | float | str | None = None, tower: str = "both", classnames: Iterable[str] | None = None,
            tokenizer: Callable | None = None, init_from: str | None = None,
            frozen_dtype: torch.dtype | None = None, model_name: str | None = None, batch_size: int | None = None,
            text_batch_size: int | None = None, text_len: int | None = None, **opts) -> nn.Module:
    """Prepare ``model`` (an open_clip CLIP model) for PEFT with ``method``, in place; returns ``model``.

    method          one of ``METHODS`` (``ln``, ``bitfit``, ``clipfit``, ``llu``, ``linear-probe``, ``coop``,
                    ``adapter``, ``full``, ...) or a ``+`` combination (``ln+linear-probe``, ``ln+coop``, ``ln+adapter``)
    lean            None (default): swap in the fused / SDPA modules (``leanclip.lean``) on every tower they cover
                    (open_clip ViT and text towers, timm ViT / EVA towers, Hugging Face BERT-style text towers); a
                    tower they do not cover (ConvNeXt, ModifiedResNet, mT5, unknown block types) keeps its modules,
                    named in a one-line notice; True: lean everywhere or a ValueError naming what is not covered;
                    False: the plain modules
    recompute       ``none`` | ``mlp`` | ``mlp+qkv`` | ``block`` | ``auto`` (needs ``memory_budget`` and
                    ``batch_size``: ``leanclip.budget`` picks each block's policy and the chunk whose predicted step
                    peak fits, with the least recompute; the plan is printed and recorded)
    batch_size, text_batch_size, text_len   with ``auto``: images per step, class prompts per step (default
                    ``batch_size``; 0: the text tower is not run in the step), and their token length (default the
                    full context)
    memory_budget   with ``auto``: the step's peak, in bytes (an int, or a string such as ``"12GiB"``) or as a
                    fraction in (0, 1] of plain open_clip's predicted peak for this model and batch
    recompute_chunk with ``recompute="block"``: samples per chunk of each block's forward and backward, so the
                    backward holds one chunk's activations instead of the batch's (None: the whole batch)
    tower           ``image`` | ``text`` | ``both`` for methods with a tower option (``ln``, ``bitfit``)
    classnames, tokenizer   for ``coop`` (required) and ``linear-probe`` (zero-shot init)
    init_from       path of a trainable-only checkpoint (``save_trainable``) loaded before the method is applied
    frozen_dtype    e.g. ``torch.bfloat16``: frozen tower weights stored in that dtype (trainable ones stay fp32)
    model_name      recorded in ``model.leanclip_info``
    **opts          method options (``n_ctx``, ``beta``, ``gamma``, ``num_classes``, ``reduction``, ``ratio``, ...)

    Methods that are not defined on a tower (``clipfit`` on a tower without LayerNorms, ``coop`` without open_clip
    token embeddings, ...) raise a ValueError naming the tower class. Transactional: every argument, option, the
    towers and the ``init_from`` file are validated before the model is touched, and an error midway (e.g. no
    recompute policy fits ``memory_budget``) restores the model exactly (``_ModelState``).
    """
    _check_supported(model)
    parts = parse_method(method)
    check_tower(tower)
    _check_recompute_args(lean, recompute, memory_budget, batch_size, recompute_chunk)
    for name, size in (("batch_size", batch_size), ("text_batch_size", text_batch_size), ("text_len", text_len)):
        # an int >= 1, the range the command line's --batch-size has (leanclip.utils); text_batch_size=0: the step
        # does not run the text tower (class text features computed once)
        if size is not None and not (name == "text_batch_size" and size == 0 and type(size) is int):
            utils.check_number(name, size, kind_of="batch_size")
    _check_frozen_dtype(frozen_dtype, lean)
    classnames = None if classnames is None else check_classnames(classnames)
    per_opts = _split_options(parts, method, opts, {"tower": tower, "classnames": classnames, "tokenizer": tokenizer})
    notices = _check_methods(model, parts, per_opts)
    loaded = _init_from_names(model, init_from) if init_from is not None else []
    lean_on, lean_notices, lean_towers = _choose_lean(model, lean, recompute, frozen_dtype)
    for message in notices + lean_notices:  # everything is validated: say what will differ from the usual
        notice(message)
    state = _ModelState(model, loaded)
    try:
        added = _apply_methods(model, parts, per_opts, init_from)
        chosen, plan = recompute, None
        if lean_on and recompute == "auto":
            plan = _plan_for_budget(model, memory_budget, batch_size, dict(
                text_batch_size=text_batch_size, text_len=text_len, dtype=frozen_dtype), lean_towers)
        elif lean_on:
            _lean.apply_lean(model, chosen, recompute_chunk, towers=lean_towers)
        else:
            _lean.remove_lean(model)
        if frozen_dtype is not None:
            _cast_frozen(model, frozen_dtype)
        options = {k: _jsonable(v) for k, v in opts.items()}
        options.update(lean=lean_on, recompute=chosen, tower=tower)
        if lean_towers is not None:
            options["lean_towers"] = lean_towers
        if recompute_chunk is not None:
            options["recompute_chunk"] = recompute_chunk
        if plan is not None:
            options.update(recompute_requested="auto", memory_budget=_jsonable(memory_budget), batch_size=batch_size,
                           text_batch_size=text_batch_size, text_len=text_len, recompute_plan=plan.as_record())
            options["recompute"] = "auto"
        if classnames is not None:
            options["classnames"] = classnames
        if frozen_dtype is not None:
            options["frozen_dtype"] = _jsonable(frozen_dtype)
        if init_from is not None:
            options["init_from"] = str(init_from)
        json.dumps(options)  # must stay serialisable (checkpoint metadata)
        model.leanclip_info = {"method": "+".join(parts), "options": options, "model_name": model_name,
                               "version": version(), "modules": list(added)}
    except BaseException:
        state.restore()
        raise
    return model


def merge(model: nn.Module) -> nn.Module:
    """A plain model holding what ``model`` trained, for export: open_clip's own modules (or the ``transformers``
    model) with equal outputs; ``model`` is left unchanged. ln, bitfit, clipfit and full train weights the model
    already has, so nothing is folded; LoRA's pairs are folded into their projections (``leanclip.methods.lora.merge``).
    A method that adds modules a plain model has no place for (prompts, heads, adapters, LLU's maps) is a ValueError
    naming it. Frozen weights kept in 16 bits come back in the trainable parameters' dtype."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"merge needs an nn.Module, got {type(model).__name__}")
    info = getattr(model, "leanclip_info", None)
    if not info:
        raise ValueError("merge: the model was not prepared by leanclip.prepare (nothing to fold)")
    parts = parse_method(info["method"])
    kept = [p for p in parts if not METHOD_TRAITS[p].mergeable]
    if kept:
        raise ValueError(f"merge: method {info['method']!r}: {', '.join(kept)} adds modules a plain model has no "
                         f"place for; keep its trainable parameters with leanclip.save_trainable instead")
    if "lora" in parts:
        return lora.merge(model)
    out = copy.deepcopy(model)
    _lean.remove_lean(out)
    if info.get("options", {}).get("frozen_dtype"):
        out.to(next(p.dtype for p in model.parameters() if p.requires_grad))
    out.__dict__.pop("leanclip_info", None)
    return _hf.to_transformers(out) if _hf.is_transformers(out) else out

