"""The names of the files in a run folder, in one place: the loops write them, the commands check, clear and resume
them, the sweep looks for them.

    <output>/checkpoint.safetensors   trainable weights + optimizer + RNG state (each epoch, and at the end)
    <output>/log.jsonl                one line per logged step
    <output>/summary.json             the loop's summary (library API)
    <output>/result.json              the command's result (``leanclip train``); eval.json / zeroshot.json likewise
    <output>/features/                the few-shot feature records (``LEANCLIP_FEATURE_CACHE``)
"""
CHECKPOINT_NAME = "checkpoint.safetensors"
LOG_NAME = "log.jsonl"
SUMMARY_NAME = "summary.json"
RESULT_FILES = {"train": "result.json", "eval": "eval.json", "zeroshot": "zeroshot.json"}  # by command
RESULT_NAME = RESULT_FILES["train"]
FEATURES_DIR = "features"

# what a training run leaves in its folder: a folder holding any of these holds a run (--resume / --overwrite)
RUN_FILES = (CHECKPOINT_NAME, LOG_NAME, RESULT_NAME, SUMMARY_NAME)
# kept across --overwrite: the few-shot records are keyed by shots, seed and data, so a new run reuses or adds its own
RUN_DIRS = (FEATURES_DIR,)
