"""Trainable-only checkpoints (+ optimizer state) and local pretrained weights."""
import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from leanclip import checkpoint, features, methods
from leanclip.configs import register_tiny_config

CLASSNAMES = ["cat", "dog", "bird"]


def _train(model, opt, tokenizer, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        images = torch.randn(2, 3, 32, 32, generator=g)
        img = features.image_features(model, images)
        txt = features.text_features(model, CLASSNAMES, None, tokenizer)
        loss = F.cross_entropy(features.class_logits(model, img, txt), torch.tensor([0, 2]))
        if hasattr(model, "llu_image"):
            loss = loss + model.llu_image.reg() + model.llu_text.reg()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _params(model):
    return {n: p.detach().clone() for n, p in methods.trainable_parameters(model)}


def _prep(m, method, tokenizer, **kw):
    torch.manual_seed(0)
    methods.prepare(m, method, classnames=CLASSNAMES, tokenizer=tokenizer, model_name="leanclip-tiny", **kw)
    if hasattr(m, "llu_image"):
        m.llu_image.set_bank(torch.randn(6, 64))
        m.llu_text.set_bank(torch.randn(3, 64))
    return m


@pytest.mark.parametrize("method,make_opt", [
    ("ln", lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, weight_decay=5e-4)),
    ("ln+coop", lambda ps: torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.98), weight_decay=0.1)),
    ("llu", lambda ps: torch.optim.AdamW([{"params": ps[:1], "weight_decay": 0.0},
                                         {"params": ps[1:], "weight_decay": 0.05, "lr": 3e-4}], lr=1e-3)),
])
def test_round_trip_with_optimizer(fresh_tiny, tokenizer, tmp_path, method, make_opt):
    a = _prep(fresh_tiny(), method, tokenizer)
    opt_a = make_opt([p for _, p in methods.trainable_parameters(a)])
    _train(a, opt_a, tokenizer)
    path = tmp_path / "run" / "ckpt.safetensors"
    checkpoint.save_trainable(a, path, optimizer=opt_a, step=3, extra_meta={"epoch": 1, "note": "x"})
    assert os.listdir(path.parent) == ["ckpt.safetensors"]  # no temp file left behind

    b = _prep(fresh_tiny(), method, tokenizer)
    opt_b = make_opt([p for _, p in methods.trainable_parameters(b)])
    meta = checkpoint.load_trainable(b, path, optimizer=opt_b)
    assert meta["method"] == method and meta["step"] == 3 and meta["extra"] == {"epoch": 1, "note": "x"}
    assert meta["model_name"] == "leanclip-tiny" and meta["options"]["lean"] is True
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    if method == "llu":
        assert torch.equal(a.llu_image.bank, b.llu_image.bank)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i, st in sa["state"].items():
        assert st.keys() == sb["state"][i].keys()
        for k, v in st.items():
            w = sb["state"][i][k]
            assert (torch.equal(v, w) and v.dtype == w.dtype) if isinstance(v, torch.Tensor) else v == w
    # continuing from the checkpoint is bit-identical to never stopping
    _train(a, opt_a, tokenizer, steps=2, seed=7)
    _train(b, opt_b, tokenizer, steps=2, seed=7)
    pa, pb = _params(a), _params(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_metadata_and_overwrite(fresh_tiny, tokenizer, tmp_path):
    from safetensors import safe_open

    m = _prep(fresh_tiny(), "clipfit", tokenizer)
    path = tmp_path / "c.safetensors"
    checkpoint.save_trainable(m, path)
    checkpoint.save_trainable(m, path)  # atomic replace of an existing file
    assert os.listdir(tmp_path) == ["c.safetensors"]  # no temp file left
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["method"] == "clipfit" and meta["format"] == checkpoint.FORMAT
    assert json.loads(meta["param_names"]) == [n for n, _ in methods.trainable_parameters(m)]
    assert keys == set(json.loads(meta["param_names"]))
    assert json.loads(meta["options"])["recompute"] == "none"
    assert "optimizer" not in meta
    # no optimizer state in the file, but one is asked for
    opt = torch.optim.SGD([p for _, p in methods.trainable_parameters(m)], lr=0.1)
    with pytest.raises(ValueError, match="no optimizer state"):
        checkpoint.load_trainable(m, path, optimizer=opt)


def test_mismatch_errors_never_partially_load(fresh_tiny, tokenizer, tmp_path):
    src = _prep(fresh_tiny(), "ln", tokenizer)
    with torch.no_grad():
        for _, p in methods.trainable_parameters(src):
            p.add_(1.0)
    path = checkpoint.save_trainable(src, tmp_path / "ln.safetensors")

    def check(model, match, **kw):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with pytest.raises(ValueError, match=match):
            checkpoint.load_trainable(model, path, **kw)
        assert all(torch.equal(before[n], p) for n, p in model.named_parameters())

    check(_prep(fresh_tiny(), "bitfit", tokenizer), "method 'ln' but the model was prepared with 'bitfit'")
    check(_prep(fresh_tiny(), "ln", tokenizer, tower="image"), "not trainable in the model")
    check(fresh_tiny(), "not prepared")
    # same method, extra trainable parameter in the model
    m = _prep(fresh_tiny(), "ln", tokenizer)
    m.logit_scale.requires_grad_(True)
    check(m, "missing from the checkpoint: \\['logit_scale'\\]")
    # shape mismatch: a different model config, same method
    wide = register_tiny_config("leanclip-tiny-w96", embed_dim=96, vision_cfg={"width": 96}, text_cfg={"width": 96})
    import open_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = open_clip.create_model(wide, pretrained=None)
    check(_prep(w, "ln", tokenizer), "shape mismatch")
    # coop context length differs
    c4 = checkpoint.save_trainable(_prep(fresh_tiny(), "coop", tokenizer, n_ctx=4), tmp_path / "c4.safetensors")
    c16 = _prep(fresh_tiny(), "coop", tokenizer, n_ctx=16)
    with pytest.raises(ValueError, match="shape mismatch for prompt_learner.ctx"):
        checkpoint.load_trainable(c16, c4)
    # optimizer over different parameters
    m = _prep(fresh_tiny(), "ln", tokenizer)
    opt_src = torch.optim.SGD([p for _, p in methods.trainable_parameters(src)], lr=0.1, momentum=0.9)
    _train(src, opt_src, tokenizer, steps=1)
    p2 = checkpoint.save_trainable(src, tmp_path / "ln2.safetensors", optimizer=opt_src)
    opt = torch.optim.SGD([p for _, p in methods.trainable_parameters(m)][:3], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="param group 0 holds different parameters"):
        checkpoint.load_trainable(m, p2, optimizer=opt)
    opt = torch.optim.Adam([p for _, p in methods.trainable_parameters(m)])
    with pytest.raises(ValueError, match="optimizer is SGD"):
        checkpoint.load_trainable(m, p2, optimizer=opt)


def test_bad_files_and_save_errors(fresh_tiny, tokenizer, tmp_path):
    m = _prep(fresh_tiny(), "ln", tokenizer)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        checkpoint.load_trainable(m, junk)
    with pytest.raises(FileNotFoundError):
        checkpoint.load_trainable(m, tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not a leanclip trainable checkpoint"):
        checkpoint.load_trainable(m, other)
    with pytest.raises(ValueError, match="not prepared"):
        checkpoint.save_trainable(fresh_tiny(), tmp_path / "x.safetensors")
    opt = torch.optim.SGD(m.parameters(), lr=0.1)  # includes frozen parameters
    with pytest.raises(ValueError, match="frozen parameters"):
        checkpoint.save_trainable(m, tmp_path / "x.safetensors", optimizer=opt)


# ----------------------------------------------------------------------------------------------------------- pretrained
def test_load_pretrained(fresh_tiny, tokenizer, tmp_path, create_model):
    src = fresh_tiny()
    with torch.no_grad():
        src.visual.proj.add_(1.0)
    pt, st = tmp_path / "w.pt", tmp_path / "w.safetensors"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, pt)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(st))
    for path in (pt, st):
        dst = _prep(fresh_tiny(), "llu", tokenizer)  # added modules are not expected in the file
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            info = checkpoint.load_pretrained(dst, path)
        assert not info["openai"]
        assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())
    # OpenAI-style checkpoint into a GELU model: warn; into a QuickGELU model: silent
    sd = dict(src.state_dict())
    sd["input_resolution"] = torch.tensor(32)
    op = tmp_path / "openai-like.pt"
    torch.save(sd, op)
    with pytest.warns(UserWarning, match="QuickGELU"):
        checkpoint.load_pretrained(fresh_tiny(), op)
    qname = register_tiny_config("leanclip-tiny-qg", quick_gelu=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checkpoint.load_pretrained(create_model(qname), op)["openai"]
    # errors (tags, hub ids and folders: tests/engine/test_weights.py)
    with pytest.raises(ValueError, match="URLs are not read"):
        checkpoint.load_pretrained(fresh_tiny(), "https://example.com/w.pt")
    with pytest.raises(FileNotFoundError):
        checkpoint.load_pretrained(fresh_tiny(), tmp_path / "nope.pt")
    partial = tmp_path / "partial.pt"
    torch.save({k: v + 1 for k, v in src.state_dict().items() if not k.startswith("visual.")}, partial)
    m = fresh_tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="missing keys"):
        checkpoint.load_pretrained(m, partial)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # nothing copied
    bad = tmp_path / "bad.pt"
    torch.save({"visual.proj": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="shape mismatch for visual.proj"):
        checkpoint.load_pretrained(m, bad)


# ----------------------------------------------------------------------------------------------------------- fingerprint
def _patch4(create_model):
    """The tiny config with patch 4 instead of 8: every trainable LayerNorm has the same shape, conv1 and the
    positional embedding do not (as ViT-B-32 vs ViT-B-16)."""
    name = register_tiny_config("leanclip-tiny-p4", vision_cfg={"patch_size": 4})
    torch.manual_seed(0)
    return name, create_model(name)


def _ln_shapes(model):
    return {n: tuple(p.shape) for n, p in methods.trainable_parameters(model)}


def test_architecture_fingerprint_refuses_same_width_other_patch(fresh_tiny, tokenizer, tmp_path, create_model):
    src = _prep(fresh_tiny(), "ln", tokenizer)
    with torch.no_grad():
        for _, p in methods.trainable_parameters(src):
            p.add_(1.0)
    path = checkpoint.save_trainable(src, tmp_path / "ln.safetensors")
    arch = json.loads(checkpoint._read(path)[0]["architecture"])
    assert arch["model_name"] == "leanclip-tiny" and arch["frozen_shapes"]["visual.conv1.weight"] == [64, 3, 8, 8]
    assert not any(n in arch["frozen_shapes"] for n in _ln_shapes(src))  # frozen tensors only
    name, other = _patch4(create_model)
    torch.manual_seed(0)
    methods.prepare(other, "ln", model_name=name)
    assert _ln_shapes(other) == _ln_shapes(src)  # the trainable side alone cannot tell them apart
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the model-name warning
        with pytest.raises(ValueError) as err:
            checkpoint.load_trainable(other, path)
    msg = str(err.value)
    assert "\n" not in msg and "another architecture" in msg
    assert "leanclip-tiny " in msg and "leanclip-tiny-p4" in msg and "visual.conv1.weight" in msg
    assert all(torch.equal(before[n], p) for n, p in other.named_parameters())  # nothing copied
    # "LN as initialization" into another method of the other architecture: refused too
    other_bitfit = methods.prepare(_patch4(create_model)[1], "bitfit", model_name=name)
    with pytest.raises(ValueError, match="another architecture.*visual.conv1.weight"):
        checkpoint.load_into(other_bitfit, path)


def test_fingerprint_is_stable_and_old_files_still_load(fresh_tiny, tokenizer, tmp_path, create_model):
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = _prep(fresh_tiny(), "ln", tokenizer, lean=False)
    with torch.no_grad():
        for _, p in methods.trainable_parameters(src):
            p.add_(1.0)
    path = checkpoint.save_trainable(src, tmp_path / "ln.safetensors")
    # same architecture, lean modules and bf16 frozen weights: same fingerprint, loads
    dst = _prep(fresh_tiny(), "ln", tokenizer, lean=True, frozen_dtype=torch.bfloat16)
    assert checkpoint.architecture(dst)["frozen_digest"] == checkpoint.architecture(src)["frozen_digest"]
    checkpoint.load_trainable(dst, path)
    assert all(torch.equal(p, _params(src)[n]) for n, p in _params(dst).items())
    # a file without the fingerprint and the digest (written before they existed) loads into any architecture whose
    # names match
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k not in ("architecture", "sha256")}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=meta)
    name, other = _patch4(create_model)
    methods.prepare(other, "ln", model_name=name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checkpoint.load_trainable(other, old)
    assert all(torch.equal(p, _params(src)[n]) for n, p in _params(other).items())


def _damage_tail(path, n=64):
    """Flip the last ``n`` bytes of a file: tensor bytes of a safetensors file (the header still parses)."""
    raw = bytearray(open(path, "rb").read())
    raw[-n:] = bytes(b ^ 0xFF for b in raw[-n:])
    open(path, "wb").write(bytes(raw))


def test_a_damaged_checkpoint_is_refused_by_every_reader(fresh_tiny, tokenizer, tmp_path):
    src = _prep(fresh_tiny(), "ln", tokenizer)
    opt = torch.optim.SGD([p for _, p in methods.trainable_parameters(src)], lr=0.1, momentum=0.9)
    _train(src, opt, tokenizer, steps=1)
    path = checkpoint.save_trainable(src, tmp_path / "ln.safetensors", optimizer=opt, step=1)
    checkpoint.verify(path)
    _damage_tail(path)
    dst = _prep(fresh_tiny(), "ln", tokenizer)
    before = _params(dst)
    readers = {
        "verify": lambda: checkpoint.verify(path),
        "load_trainable": lambda: checkpoint.load_trainable(dst, path),
        "read_trainable": lambda: checkpoint.read_trainable(path),
        "load_into": lambda: checkpoint.load_into(dst, path),
        "check_init_from": lambda: checkpoint.check_init_from(dst, path),
        "init_from": lambda: methods.prepare(fresh_tiny(), "bitfit", init_from=str(path)),
    }
    for name, read in readers.items():
        with pytest.raises(ValueError, match=rf"checkpoint {path} is damaged: .*sha256"):
            read()
    assert all(torch.equal(p, before[n]) for n, p in _params(dst).items())  # nothing was copied


def test_metadata_is_covered_by_the_digest_and_old_files_warn(fresh_tiny, tokenizer, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = _prep(fresh_tiny(), "ln", tokenizer)
    path = checkpoint.save_trainable(src, tmp_path / "ln.safetensors", step=3)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    assert len(meta["sha256"]) == 64
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata={**meta, "step": "4"})
    with pytest.raises(ValueError, match="is damaged"):
        checkpoint.verify(tmp_path / "edited.safetensors")
    old = tmp_path / "old.safetensors"  # written before checkpoints recorded a digest: loads, with a warning
    save_file(tensors, str(old), metadata={k: v for k, v in meta.items() if k != "sha256"})
    dst = _prep(fresh_tiny(), "ln", tokenizer)
    with pytest.warns(UserWarning, match=rf"checkpoint {old} records no sha256"):
        checkpoint.load_trainable(dst, old)
    assert all(torch.equal(p, _params(src)[n]) for n, p in _params(dst).items())
