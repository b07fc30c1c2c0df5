"""The base weights to train on: a Hub/local HF model, or plain safetensors materialised from a GGUF.

transformers loads a GGUF (dequantized) but refuses to train a model whose config still says
``quantization_config``; so the GGUF is converted once to a plain HF folder, cached by its sha256.

    >>> folder = materialise(Path("SmolLM2-135M-Instruct.Q4_1.gguf"), Path("data/cache/base"))
    >>> AutoModelForCausalLM.from_pretrained(folder)
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from space.model import sha256_of

log = logging.getLogger(__name__)

DONE = "materialised.ok"


def materialise(gguf: Path, cache_dir: Path, sha256: str | None = None) -> Path:
    """An HF model folder (config, float32 safetensors, tokenizer, chat template) with the GGUF's weights."""
    sha256 = sha256 or sha256_of(gguf)
    out = Path(cache_dir) / sha256[:16]
    if (out / DONE).exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("materialising %s as safetensors in %s (once per GGUF)", gguf, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain float tensors; without this the trainer refuses the model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / DONE).write_text(f"{gguf}\n{sha256}\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def base_folder(train_base: str | None, gguf: Path, cache_dir: Path, sha256: str | None = None) -> str:
    """Where to load base weights from: the configured HF model, else the GGUF materialised."""
    if train_base:
        return train_base
    return str(materialise(gguf, cache_dir, sha256))
