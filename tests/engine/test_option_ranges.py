"""Method options within bounds: every numeric option of every method declares its range (leanclip.registry
.OptionRange), prepare and ``--opt`` check it before anything is built; LLU's gate stays finite over its whole gamma
range; CoOp's init_text and std either take effect or are refused."""
import math

import pytest
import torch
import torch.nn.functional as F

from leanclip import heads, kernels, methods
from leanclip.cli import UsageError
from leanclip.cli.common import method_opts_from_flags
from leanclip.registry import METHODS, OptionRange, method_options, option_range, register_method

CLASSNAMES = ["cat", "dog"]
_NOT_NUMBERS = {"classnames", "tokenizer", "templates", "tower", "init_text"}


def test_every_numeric_option_declares_its_range():
    """A method option that sizes something without a bound is how rank=10**20 reached an allocation: a new one
    must come with its range."""
    ours = [name for name in METHODS if METHODS[name].__module__.startswith("leanclip.")]
    unbounded = [f"{name}.{k}" for name in ours for k, default in method_options(name).items()
                 if k not in _NOT_NUMBERS and not isinstance(default, (bool, str, tuple))
                 and option_range(name, k) is None]
    assert len(ours) > 15 and not unbounded


def test_lilt_temperature_range_is_the_one_the_module_keeps():
    from leanclip.contrastive import TEMPERATURE_MAX, TEMPERATURE_MIN
    from leanclip.methods.lilt import LILT_METHODS

    for name in LILT_METHODS:
        r = option_range(name, "temperature")
        assert (r.lo, r.hi) == (TEMPERATURE_MIN, TEMPERATURE_MAX)


def test_option_range_admits():
    r = OptionRange(float, 0.0, 1.0, hi_open=True)
    assert r.admits(0) and r.admits(0.5) and r.admits(None)
    assert not any(r.admits(v) for v in (1.0, -0.1, math.nan, math.inf, True, "0.5"))
    n = OptionRange(int, 1, 8)
    assert n.admits(8) and not n.admits(2.0) and not n.admits(9) and not n.admits(10 ** 30)
    assert str(n) == "an int in [1, 8]" and str(OptionRange(float, 0, 1, lo_open=True)) == "a finite number in (0, 1]"
    with pytest.raises(ValueError, match="options the method does not take"):
        register_method("test-ranged", lambda model, k=1: {}, ranges={"other": n})


@pytest.mark.parametrize("method,pair,needle", [
    ("lora", "rank=99999999999999999999", "rank of method 'lora' must be an int in [1, 4096]"),
    ("lora", "alpha=1e300", "alpha"),
    ("llu", "gamma=1e308", "gamma of method 'llu' must be a finite number in [0, 10000]"),
    ("coop", "std=1e308", "std"),
    ("linear-probe", "num_classes=0", "num_classes"),
    ("ln+compacter", "n=100", "n of method 'compacter'"),
])
def test_opt_out_of_range_is_refused_before_the_model(method, pair, needle):
    with pytest.raises(UsageError) as e:
        method_opts_from_flags(method.split("+"), [pair])
    assert needle in str(e.value)


def test_opt_without_a_default_is_read_as_its_declared_kind():
    assert method_opts_from_flags(["linear-probe"], ["num_classes=5"]) == {"num_classes": 5}
    assert method_opts_from_flags(["coop"], ["std=0.1", "init_text="]) == {"std": 0.1, "init_text": ""}
    with pytest.raises(UsageError, match="expected float"):
        method_opts_from_flags(["coop"], ["std=wide"])


def test_prepare_checks_ranges_before_the_method_check(fresh_tiny):
    with pytest.raises(ValueError, match="rank must be an int in"):
        methods.prepare(fresh_tiny(), "lora", rank=10 ** 20)
    with pytest.raises(ValueError, match="rank=65 exceeds the width 64"):  # the tiny model's width
        methods.prepare(fresh_tiny(), "lora", rank=65)
    m = methods.prepare(fresh_tiny(), "lora", rank=64, targets="fc")  # full rank of the narrower side: allowed
    assert m.visual.transformer.resblocks[0].lora.fc.A.shape == (64, 64)


# ----------------------------------------------------------------------------------------------------------- LLU
@pytest.mark.parametrize("gamma", [20.0, heads.LLU_GAMMA_MAX])
def test_llu_gate_stays_within_beta_over_the_gamma_range(gamma):
    """The bank holds the samples themselves: 1 - cos comes out slightly below 0 in fp32, and exp(-gamma * d) above
    1 (inf past gamma ~3.7e8, NaN past fp32's max); the gate must stay in [0, beta] and the output finite."""
    torch.manual_seed(0)
    x = F.normalize(torch.randn(64, 512), dim=-1)
    head = heads.LLUHead(512, beta=0.5, gamma=gamma)
    head.set_bank(x)
    with kernels.set_backend("torch"):
        a = head.alpha(x)
        out = head(x)
    assert float(a.max()) <= 0.5 and float(a.min()) >= 0.0
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="gamma"):
        heads.LLUHead(512, beta=0.5, gamma=heads.LLU_GAMMA_MAX * 10)


# ----------------------------------------------------------------------------------------------------------- CoOp
def _coop(model, tokenizer, **kw):
    return methods.prepare(model, "coop", classnames=CLASSNAMES, tokenizer=tokenizer, **kw)


def _ctx(model):
    return model.prompt_learner.ctx.detach()


def _token_embeddings(model, tokenizer, text, n):
    tok = torch.as_tensor(tokenizer([text]))
    return model.token_embedding(tok)[0, 1:1 + n].detach().float()


def test_coop_init_text_takes_effect_or_is_refused(fresh_tiny, tokenizer):
    prep = lambda **kw: _coop(fresh_tiny(), tokenizer, **kw)  # noqa: E731
    m = prep()  # CoOp's rule: "a photo of a" for its 4-token context
    assert torch.allclose(_ctx(m), _token_embeddings(m, tokenizer, "a photo of a", 4))
    m = prep(n_ctx=3, init_text="a good photo")
    assert torch.allclose(_ctx(m), _token_embeddings(m, tokenizer, "a good photo", 3))
    with pytest.raises(ValueError, match="init_text 'a photo' is 2 tokens, n_ctx=4"):
        prep(init_text="a photo")
    with pytest.raises(ValueError, match="longer than the tokenizer's 77-token context"):
        prep(init_text=" ".join(["photo"] * 4000))


def test_coop_std_takes_effect_or_is_refused(fresh_tiny, tokenizer):
    prep = lambda **kw: _coop(fresh_tiny(), tokenizer, **kw)  # noqa: E731
    torch.manual_seed(0)
    wide = _ctx(prep(n_ctx=16, std=0.5)).std()  # a random start (no init text for 16 tokens)
    torch.manual_seed(0)
    default = _ctx(prep(n_ctx=16)).std()
    assert 0.4 < float(wide) < 0.6 and 0.015 < float(default) < 0.025
    assert 0.4 < float(_ctx(prep(init_text="", std=0.5)).std()) < 0.6
    with pytest.raises(ValueError, match="std=0.5 has no effect"):
        prep(std=0.5)  # the context starts from "a photo of a"
    with pytest.raises(ValueError, match="std must be a finite number in"):
        prep(init_text="", std=1e308)
