"""Tiny Hugging Face ``transformers`` CLIP and SigLIP models laid out in a Hugging Face cache under a test's tmp_path
(``models--org--name/refs/main`` + ``snapshots/<rev>/``: config.json, model.safetensors, a word-level tokenizer,
the image processor config), read offline (``HF_HUB_OFFLINE=1``), as ``transformers:<org/name>`` names them."""
import torch

WORDS = ["a", "photo", "of", "the", "cat", "dog", "bird", "car", "red", "blue", "class", "tiny", "image", "this",
         "is", "an", "object", "shape", "circle", "square"]
CLIP_ID, SIGLIP_ID = "leanclip-test/tiny-clip", "leanclip-test/tiny-siglip"
_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _vocab(family: str) -> dict:
    """CLIP's layout: start and end of text are the two highest ids (open_clip and CoOp find the end by argmax)."""
    words = ["<pad>", "<unk>"] + WORDS + (["<bos>", "<eos>"] if family == "clip" else ["</s>"])
    return {w: i for i, w in enumerate(words)}


def tiny_config(family: str):
    """A 2-layer, width-32 CLIPConfig / SiglipConfig (images 32x32, patches 8, context 16)."""
    from transformers import CLIPConfig, SiglipConfig

    vocab = _vocab(family)
    vis = dict(_TOWER, image_size=32, patch_size=8)
    if family == "clip":
        txt = dict(_TOWER, vocab_size=len(vocab), max_position_embeddings=16, pad_token_id=0,
                   bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"])
        return CLIPConfig(text_config=txt, vision_config=vis, projection_dim=24)
    txt = dict(_TOWER, vocab_size=len(vocab), max_position_embeddings=16, pad_token_id=0, eos_token_id=vocab["</s>"],
               projection_size=32)
    return SiglipConfig(text_config=txt, vision_config=vis)


def tiny_model(family: str, seed: int = 0):
    """The transformers model of :func:`tiny_config`, seeded random weights (logit_bias non-zero for SigLIP)."""
    from transformers import CLIPModel, SiglipModel

    torch.manual_seed(seed)
    m = (CLIPModel if family == "clip" else SiglipModel)(tiny_config(family)).eval()
    if family == "siglip":
        with torch.no_grad():
            m.logit_bias.fill_(-1.5)
    return m


def _tokenizer(family: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = _vocab(family)
    unk, last = "<unk>", len(vocab) - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if family == "clip":  # <bos> text <eos>, as CLIP's tokenizer
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                           special_tokens=[("<bos>", last - 1), ("<eos>", last)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                       unk_token=unk)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", last)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token=unk)


def lay_out_cache(cache, families=("clip", "siglip"), seed: int = 0) -> dict:
    """Save each family's tiny model (safetensors), tokenizer and image processor config into the Hugging Face cache
    folder ``cache`` (the ``hf_cache`` fixture: offline, the cache variables pointing there). Returns {family:
    transformers model}."""
    from transformers import CLIPImageProcessor

    made = {}
    for family in families:
        made[family] = tiny_model(family, seed)
        save_repo(cache, CLIP_ID if family == "clip" else SIGLIP_ID, made[family])
    return made


def save_repo(cache, repo_id: str, model) -> None:
    """``model`` (a tiny CLIP or SigLIP), its tokenizer and image processor config as hub repo ``repo_id`` of the
    Hugging Face cache folder ``cache``."""
    from transformers import CLIPImageProcessor

    family = model.config.model_type
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    rev = "0" * 40
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    model.save_pretrained(snap, safe_serialization=True)
    _tokenizer(family).save_pretrained(snap)
    mean, std = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]) \
        if family == "clip" else ([0.5] * 3, [0.5] * 3)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32, image_mean=mean, image_std=std).save_pretrained(snap)
