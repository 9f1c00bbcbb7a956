"""``block`` recompute over batch chunks: the same outputs and gradients as the whole-batch block (and as plain
open_clip) for every method that trains inside the blocks; exact in float64; dropout replayed per chunk; the backward
never runs a block on more than one chunk."""
import copy

import pytest
import torch

from leanclip import lean, methods
from tests.engine.test_lean import CLASSNAMES, _compare, _prep, _step

CHUNK_CASES = [("ln", {}), ("bitfit", {}), ("clipfit", {}), ("full", {}), ("ln+coop", {}), ("lora", {}),
               ("houlsby", {}), ("compacter", {}), ("ln+lora", {})]


def _chunked(model, chunk):
    return lean.set_recompute(model, "block", chunk=chunk)


@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("method,opts", CHUNK_CASES, ids=[m for m, _ in CHUNK_CASES])
def test_chunked_block_equals_plain(method, opts, chunk, fresh_tiny, tokenizer):
    torch.manual_seed(7)
    images, labels = torch.randn(5, 3, 32, 32), torch.tensor([0, 2, 1, 1, 0])
    # the reference: lean "none" (equal to plain open_clip, test_lean; LoRA and the in-layer adapters need lean)
    ref = _prep(fresh_tiny(), method, opts, tokenizer, True, "none").eval()  # eval: LoRA dropout off
    leanm = _chunked(_prep(fresh_tiny(), method, opts, tokenizer, True, "block"), chunk).eval()
    _compare(ref, leanm, tokenizer, images, labels)


def test_chunked_block_is_exact_in_float64(fresh_tiny, tokenizer):
    """Chunks change only the order in which a parameter's gradient is summed: in float64 the two agree to 1e-12."""
    torch.manual_seed(3)
    images, labels = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    whole = _prep(fresh_tiny(), "ln", {}, tokenizer, True, "block").double()
    parts = _chunked(copy.deepcopy(whole), 1)
    la, ga = _step(whole, images, labels, tokenizer)
    lb, gb = _step(parts, images, labels, tokenizer)
    assert torch.equal(la, lb)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        assert (ga[n] - gb[n]).abs().max() <= 1e-12 * ga[n].abs().max().clamp_min(1e-30), n


def test_chunked_replay_leaves_the_rng_as_the_whole_batch_does(fresh_tiny, tokenizer):
    """The backward's replay of each chunk's dropout draws runs in a forked RNG: after a step the generator is where
    the whole-batch step leaves it (both draw the same number of values), so the rest of a run is unchanged."""
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    base = _prep(fresh_tiny(), "lora", {"dropout": 0.5}, tokenizer, True, "block").train()
    after = []
    for chunk in (None, 1):
        m = lean.set_recompute(copy.deepcopy(base), "block", chunk=chunk)
        torch.manual_seed(11)
        _step(m, images, labels, tokenizer)
        after.append(torch.rand(4))
    assert torch.equal(after[0], after[1])


def _loss(model, seed, images, tokens):
    """A float64 scalar of a training forward of both towers (grad enabled: the chunked path and its dropout draws,
    as in a step; the image tower's last block at the CLS rows)."""
    torch.manual_seed(seed)
    img, txt = model.encode_image(images), model.encode_text(tokens)
    weights = torch.linspace(-1, 1, img.shape[-1], dtype=img.dtype)
    return (img * weights).sum() + (txt * weights.flip(0)).sum() + (img @ txt.T).square().sum()


def test_chunked_gradients_are_those_of_the_forward_that_ran(fresh_tiny, tokenizer):
    """With dropout (LoRA, p=0.5, training mode) and one sample per chunk, in float64: the gradient agrees with a
    central difference of the loss taken with the same seed, in every block the pooled-row last blocks included. A
    recompute that drew other masks than its forward would differentiate another function and fail this."""
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    m = _chunked(_prep(fresh_tiny(), "lora", {"dropout": 0.5}, tokenizer, True, "block").double().train(), 1)
    with torch.no_grad():  # LoRA's B starts at zero, where dropout does not reach the output: move off it
        for n, p in m.named_parameters():
            if p.requires_grad and n.endswith(".B"):
                p.normal_(0, 0.3)
    tokens = tokenizer(CLASSNAMES)
    _loss(m, 5, images, tokens).backward()
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    params = dict(m.named_parameters())
    names = [n for n in grads if n.startswith(("visual.transformer.resblocks.", "transformer.resblocks."))]
    last = [n for n in names if ".resblocks.2." in n or ".resblocks.1." in n]
    assert last, names
    eps = 1e-6
    for n in names:
        direction = torch.randn_like(params[n])
        with torch.no_grad():
            params[n].add_(eps * direction)
        up = _loss(m, 5, images, tokens).detach()
        with torch.no_grad():
            params[n].sub_(2 * eps * direction)
        down = _loss(m, 5, images, tokens).detach()
        with torch.no_grad():
            params[n].add_(eps * direction)
        numeric = (up - down) / (2 * eps)
        analytic = (grads[n] * direction).sum()
        assert torch.allclose(numeric, analytic, rtol=1e-5, atol=1e-9), (n, float(numeric), float(analytic))


def test_backward_runs_one_chunk_at_a_time(fresh_tiny, tokenizer, monkeypatch):
    """What bounds the backward's memory: every block evaluation, forward or recompute, sees at most ``chunk``
    samples of the image batch."""
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 1, 0, 2])
    m = _chunked(_prep(fresh_tiny(), "ln", {"tower": "image"}, tokenizer, True, "block"), 2)
    seen = []
    plain = lean.LeanResidualAttentionBlock._plain
    image_tower = set(map(id, m.visual.transformer.resblocks))

    def spy(self, x, mask, is_causal):
        if id(self) in image_tower:
            seen.append((x.shape[0], torch.is_grad_enabled()))
        return plain(self, x, mask, is_causal)
    rows_core = lean.LeanResidualAttentionBlock._rows_core
    rows_seen = []

    def rows_spy(self, x, rows, mask):
        if id(self) in image_tower:
            rows_seen.append(x.shape[0])
        return rows_core(self, x, rows, mask)
    head = lean.LeanResidualAttentionBlock._block_head

    def head_spy(self, x, mask, is_causal):  # a chunk's recompute where c_proj is frozen (stops at its input)
        if id(self) in image_tower:
            seen.append((x.shape[0], torch.is_grad_enabled()))
        return head(self, x, mask, is_causal)
    monkeypatch.setattr(lean.LeanResidualAttentionBlock, "_plain", spy)
    monkeypatch.setattr(lean.LeanResidualAttentionBlock, "_block_head", head_spy)
    monkeypatch.setattr(lean.LeanResidualAttentionBlock, "_rows_core", rows_spy)
    _step(m, images, labels, tokenizer)
    # the image blocks but the last (run at the CLS rows only): 3 chunks forward, 3 recomputed under grad, each
    image_blocks = len(m.visual.transformer.resblocks) - 1
    assert len(seen) == 2 * 3 * image_blocks and all(b == 2 for b, _ in seen), seen
    assert sum(grad for _, grad in seen) == 3 * image_blocks
    assert rows_seen == [2] * 6  # the last block too: its k, v and their gradients, one chunk at a time


def test_chunk_needs_block_and_a_positive_size(fresh_tiny):
    m = methods.prepare(fresh_tiny(), "ln", lean=True, classnames=CLASSNAMES)
    with pytest.raises(ValueError, match="needs recompute='block'"):
        lean.set_recompute(m, "mlp+qkv", chunk=2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive number of samples"):
            lean.set_recompute(m, "block", chunk=bad)


def test_prepare_takes_and_records_the_chunk(fresh_tiny):
    m = methods.prepare(fresh_tiny(), "ln", lean=True, recompute="block", recompute_chunk=2, classnames=CLASSNAMES)
    assert {b.leanclip_chunk for b in m.modules() if isinstance(b, lean.LeanResidualAttentionBlock)} == {2}
    assert m.leanclip_info["options"]["recompute_chunk"] == 2
    for policy in ("none", "auto"):
        with pytest.raises(ValueError, match="needs recompute='block'"):
            methods.prepare(fresh_tiny(), "ln", recompute=policy, recompute_chunk=2, memory_budget=10**9,
                            batch_size=4)


def test_train_result_records_how_memory_was_held(tmp_path, capsys):
    import json

    from leanclip import cli

    out = tmp_path / "run"
    rc = cli.main(["train", "--method", "ln", "--epochs", "1", "--shots", "1", "--recompute", "block",
                   "--recompute-chunk", "4", "--frozen-bf16", "--no-progress", "--output", str(out)])
    assert rc == 0, capsys.readouterr().err[-2000:]
    res = json.loads((out / "result.json").read_text())
    assert (res["lean"], res["recompute"], res["recompute_chunk"], res["frozen_dtype"]) == (True, "block", 4,
                                                                                          "bfloat16")


@pytest.mark.parametrize("method,opts,skips", [("ln", {}, True), ("bitfit", {}, False), ("lora", {}, True),
                                               ("lora", {"targets": "q,proj"}, False)])
def test_chunk_recompute_stops_at_a_frozen_c_proj(method, opts, skips, fresh_tiny, tokenizer, monkeypatch):
    """Where c_proj (weight and bias) is frozen and no delta sits on it, a chunk's backward takes c_proj's input
    gradient from grad_y and the weight (no forward GEMM); a trainable c_proj bias or a LoRA pair on c_proj
    recomputes it."""
    m = _chunked(_prep(fresh_tiny(), method, opts, tokenizer, True, "block"), 2).eval()
    calls = []
    grad_of_input = lean.LeanResidualAttentionBlock._mlp_out_input_grad

    def spy(self, grad_y, g):
        dg = grad_of_input(self, grad_y, g)
        if dg is not None:
            calls.append(g.shape[0])
        return dg
    monkeypatch.setattr(lean.LeanResidualAttentionBlock, "_mlp_out_input_grad", spy)
    _step(m, torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1]), tokenizer)
    assert bool(calls) == skips and all(c <= 2 for c in calls), calls
