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


def test_chunked_block_replays_dropout(fresh_tiny, tokenizer):
    """LoRA's dropout in training mode: each chunk's recompute draws the masks its forward drew, so the chunked
    gradients equal the whole-batch block's (same seed) to float32 rounding. One target, so one dropout per block:
    the chunks' forwards then draw, in order, the numbers the whole batch's one draw takes (with q, k and v each
    drawing, chunks interleave the three masks and the whole-batch run is no reference)."""
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    base = _prep(fresh_tiny(), "lora", {"dropout": 0.5, "targets": "q"}, tokenizer, True, "block").train()
    results = []
    for chunk in (None, 1):
        m = lean.set_recompute(copy.deepcopy(base), "block", chunk=chunk)
        torch.manual_seed(11)
        results.append((*_step(m, images, labels, tokenizer), torch.rand(4)))
    (la, ga, after_a), (lb, gb, after_b) = results
    assert torch.equal(after_a, after_b)  # the replay leaves the RNG where the whole-batch run left it
    assert torch.allclose(la, lb, rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=1e-4, atol=1e-6), n


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
    monkeypatch.setattr(lean.LeanResidualAttentionBlock, "_plain", spy)
    _step(m, images, labels, tokenizer)
    # the image blocks but the last (run at the CLS rows only): 3 chunks forward, 3 recomputed under grad, each
    image_blocks = len(m.visual.transformer.resblocks) - 1
    assert len(seen) == 2 * 3 * image_blocks and all(b == 2 for b, _ in seen), seen
    assert sum(grad for _, grad in seen) == 3 * image_blocks


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
