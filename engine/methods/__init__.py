"""PEFT methods on open_clip CLIP models: ``prepare(model, method, **opts)`` (in place) and ``merge``.

One module per method or family: ``ln``, ``bitfit``, ``clipfit``, ``full``, ``llu``, ``linear_probe``, ``coop``,
``cocoop``, ``prograd``, ``clip_adapter``, ``lilt``, ``lora``, ``houlsby``, ``compacter``. Each registers itself with
``leanclip.registry.register_method`` on import: the function that unlocks parameters / returns the modules to add,
its check, its traits and its typed options dataclass (``leanclip.options``). This package imports every public submodule it holds
(``pkgutil``, in sorted order, so registration order is deterministic), so a new method is one new module here and
one test file; no list to edit. Modules whose name starts with ``_`` are the machinery of ``prepare``
(``_prepare``, ``_validate``, ``_state``) and register nothing.

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
parameters are trainable unless ``fn`` froze some). The options a method accepts are its keyword parameters,
declared again with type, help and range in its options dataclass (``leanclip.options.option``; the registry holds
the two equal, and ``--opt`` is typed from it); ``tower``, ``classnames`` and ``tokenizer`` are passed to methods that
declare them, anything else is a ValueError. ``METHOD_CHECKS`` holds an optional ``check(model, **opts)`` per
method that validates option values and the towers without changing anything. Adding a method is one module::

    @dataclass(frozen=True)
    class MineOptions:
        tower: Tower = tower_option("whose LayerNorms train")  # leanclip.methods._options

    @register_method("mine", check=_check_mine, options=MineOptions)
    def _mine(model, tower="both"):
        _unlock(model, ..., tower)
        return {}

Combinations are written ``a+b`` (e.g. ``ln+coop``): the components are applied in order and trained together.
"""
from __future__ import annotations

import importlib
import pkgutil

from leanclip.configs import register_tiny_config  # noqa: F401  (re-exported for convenience)
# the registry and the parameter selection, re-exported: ``from leanclip.methods import register_method`` keeps working
from leanclip.registry import (  # noqa: F401
    METHOD_CHECKS, METHOD_OPTIONS, METHOD_TRAITS, METHODS, TASKS, TRAINERS, MethodTraits, OptionRange,
    check_option_ranges, check_task, is_closed_set, method_contrastive_defaults, method_hooks, method_loss_terms,
    method_options, method_template_set, method_train_defaults, method_trainer, parse_method, register_method,
    set_method_check,
)
from leanclip.select import (  # noqa: F401
    BIAS_RE, CLIPFIT_TEXT_RE, IMAGE_RE, TEXT_RE, TOWERS, check_coverage, check_tower, count_trainable, embed_dim,
    in_tower, layernorm_names, model_device, names_matching, notice, require_open_clip_tower, require_options, tower_class,
    tower_of, trainable_parameters, unlock, unlock_layernorms, unlock_names,
)


def method_modules() -> list[str]:
    """The names of this package's method modules (every submodule not starting with ``_``), sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def discover() -> list[str]:
    """Import every method module (each registers its methods on import; an imported one is not run again)."""
    names = method_modules()
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names


discover()

# after the method modules, so that they register in the sorted order of their names (what one imports, e.g. houlsby
# for clip_adapter, registers first) rather than in the order prepare's own imports would give
from leanclip.methods._prepare import PREPARE_OPTIONS, merge, prepare, version  # noqa: E402,F401
from leanclip.methods._validate import FROZEN_DTYPES  # noqa: E402,F401
