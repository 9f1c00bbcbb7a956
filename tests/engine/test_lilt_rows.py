"""LilT's table rows (docs/PAPERS.md) pinned to their trainable counts: the command each row letter names must train
what the paper's row trains. LilT's towers, DeiT-B (256 x 256 crops) + BERT-base joined by 256-d projections, are
built on the meta device from a local BERT-base config (no download, no memory for the weights). The deep adapter
(lilt-deep) appends one timm ViT block and one BERT layer (7,087,872 parameters each) and is pinned on those towers
(Table 3's 14.65M) and on open_clip's ViT-B-16."""
import copy
import json

import pytest
import torch

from leanclip.configs import create_random_model, register_unaligned_config
from leanclip.methods import count_trainable, prepare

BERT_BASE = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 768, "num_hidden_layers": 12,
             "num_attention_heads": 12, "intermediate_size": 3072, "vocab_size": 30522,
             "max_position_embeddings": 512, "type_vocab_size": 2, "pad_token_id": 0}

# row -> (method, options, trainable parameters on DeiT-B + BERT-base)
DEIT_BERT_ROWS = {
    "LilT-LN": ("lilt-ln", {}, 470_017),
    "LilT-BitFit": ("lilt-bitfit", {}, 598_273),
    "LilT-LwA (Table 3: 14.67M)": ("lilt-adapter", {}, 14_671_873),
    "(c) projections only": ("lilt-proj", {}, 393_217),
    "(h) LwA without LN": ("lilt-adapter", {"ln_tower": "none"}, 14_595_073),
    "(j) BitFit + LwA without LN": ("lilt-adapter", {"ln_tower": "none", "bitfit": True}, 14_761_729),
    # each tower has 25 LayerNorms of width 768: one tower's LN rows count the same
    "(n) LwA, LN of the text tower": ("lilt-adapter", {"ln_tower": "text"}, 14_633_473),
    "(o) LwA, LN of the image tower": ("lilt-adapter", {"ln_tower": "image"}, 14_633_473),
    # one appended block per tower: a DeiT-B block and a BERT-base layer, 7,087,872 each, + LilT-LN's 470,017
    "LilT-DA (Table 3: 14.65M)": ("lilt-deep", {}, 14_645_761),
    "LilT-DA, blocks from BERT's / timm's init": ("lilt-deep", {"deep_init": "random"}, 14_645_761),
    "(f) DA without LN": ("lilt-deep", {"ln_tower": "none"}, 14_568_961),
    "(k) BitFit + DA without LN": ("lilt-deep", {"ln_tower": "none", "bitfit": True}, 14_735_617),
    # Fig. 5: LN unlocked in six of the twelve blocks of each tower (2 LayerNorms of width 768 per block; the
    # LayerNorms outside the blocks stay locked), + the projections and the temperature
    "Fig. 5 pattern A": ("lilt-ln", {"image_layers": "6-11", "text_layers": "0-5"}, 430_081),
    "Fig. 5 pattern B": ("lilt-ln", {"image_layers": "0-5", "text_layers": "6-11"}, 430_081),
}

# row -> (method, options, trainable parameters on open_clip ViT-B-16)
VIT_B16_ROWS = {
    "LilT-DA": ("lilt-deep", {}, 10_961_153),
    "(f) DA without LN": ("lilt-deep", {"ln_tower": "none"}, 10_895_617),
    "(k) BitFit + DA without LN": ("lilt-deep", {"ln_tower": "none", "bitfit": True}, 11_033_857),
}


def _meta_model(name):
    with torch.device("meta"):
        return create_random_model(name, device="meta")


@pytest.fixture(scope="module")
def deit_bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert-base")
    (folder / "config.json").write_text(json.dumps(BERT_BASE))
    name = register_unaligned_config("leanclip-test-deit-b-bert-b", timm_model="deit_base_patch16_224",
                                     hf_text=str(folder), embed_dim=256, image_size=256, context_length=30)
    return _meta_model(name)


@pytest.fixture(scope="module")
def vit_b16():
    return _meta_model("ViT-B-16")


def _count(model, method, opts):
    return count_trainable(prepare(copy.deepcopy(model), method, lean=False, **opts))


@pytest.mark.parametrize("row", list(DEIT_BERT_ROWS))
def test_row_trains_what_the_paper_counts_on_deit_b_bert_b(deit_bert, row):
    method, opts, want = DEIT_BERT_ROWS[row]
    assert _count(deit_bert, method, opts) == want


@pytest.mark.parametrize("row", list(VIT_B16_ROWS))
def test_deep_adapter_rows_on_vit_b16(vit_b16, row):
    method, opts, want = VIT_B16_ROWS[row]
    assert _count(vit_b16, method, opts) == want


def test_rows_differ_by_what_they_add(deit_bert, vit_b16):
    """LwA without LN is LwA less every LayerNorm; (j) adds the non-LayerNorm biases; DA without LN is DA less
    every LayerNorm: the counts agree with the LN-only and BitFit rows."""
    ln = DEIT_BERT_ROWS["LilT-LN"][2] - DEIT_BERT_ROWS["(c) projections only"][2]
    assert DEIT_BERT_ROWS["LilT-LwA (Table 3: 14.67M)"][2] - DEIT_BERT_ROWS["(h) LwA without LN"][2] == ln
    assert DEIT_BERT_ROWS["LilT-DA (Table 3: 14.65M)"][2] - DEIT_BERT_ROWS["(f) DA without LN"][2] == ln
    block = 4 * (768 * 768 + 768) + 2 * (768 * 3072) + 3072 + 768 + 2 * 2 * 768  # attention, MLP, two LayerNorms
    assert DEIT_BERT_ROWS["LilT-DA (Table 3: 14.65M)"][2] == DEIT_BERT_ROWS["LilT-LN"][2] + 2 * block
    deep = _count(vit_b16, "lilt-deep", {})
    ln_vit = _count(vit_b16, "lilt-ln", {}) - _count(vit_b16, "lilt-proj", {})
    assert deep - _count(vit_b16, "lilt-deep", {"ln_tower": "none"}) == ln_vit
