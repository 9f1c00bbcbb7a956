"""Model families the engine runs on. Each module here is the only place that touches its library's internals
(module classes, parameter names, tower layout, weight-file helpers); the rest of the engine goes through it.

``openclip``: open_clip's CLIP / CustomTextCLIP models (ViT and ModifiedResNet image towers, open_clip text
transformers; timm and Hugging Face towers are recognised as "not ours" and get the plain-module path).
``hf_text``: open_clip's Hugging Face text towers (``HFTextEncoder``): lean BERT / RoBERTa / XLM-RoBERTa layers and
the sites the methods use on them (mT5 keeps its own modules).
``openclip_config``: open_clip model configs as untrusted input (the fields open_clip accepts, the bounds of every size
and of the whole model), checked before a config from a file is built.
"""
