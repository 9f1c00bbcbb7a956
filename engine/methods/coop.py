"""``coop`` (CoOp): a learned prompt context of ``n_ctx`` vectors spliced before each class name in the text tower,
started from the token embeddings of an init text or at random."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from leanclip import heads as _heads
from leanclip.models import transformers as _hf
from leanclip.models.openclip import text_tower
from leanclip.methods._options import context_option
from leanclip.options import OptionRange, option
from leanclip.registry import MethodTraits, register_method
from leanclip.select import require_open_clip_tower, require_options


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


@dataclass(frozen=True)
class CoopOptions:
    classnames: Any = context_option("classnames", "the class names the context is prepended to")
    tokenizer: Any = context_option("tokenizer", "tokenizes the class prompts and init_text")
    n_ctx: int = option(4, "learned context vectors", range=COOP_RANGES["n_ctx"])
    init_text: str | None = option(None, "the text whose token embeddings start the context (empty: random; "
                                         "unset: 'a photo of a' for n_ctx=4)")
    std: float | None = option(None, f"the random start's std (default {COOP_STD})", range=COOP_RANGES["std"])


@register_method("coop", check=_check_coop, options=CoopOptions,
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


def prompt_init(model, tokenizer, n_ctx: int, init_text) -> tuple[torch.nn.Embedding, torch.Tensor | None]:
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
