"""Give an encoder checkpoint without a masked-LM head (a sentence encoder such as
all-MiniLM-L6-v2, saved as ``BertModel``) the neutral head, so it loads as ``BertForMaskedLM``:
dense = identity, LayerNorm at its defaults, decoder tied to the word embeddings, bias 0. The
encoder is copied unchanged (transformers' ``BertModel`` and the result give the same hidden
states); the head's logits are then the hidden state's LayerNorm dotted with each word embedding.

    python -m sglang_hf_bridge.convert --bert PATH --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Dict

import torch

from .errors import CheckpointError

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _read_state(directory: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (directory / "model.safetensors").is_file():
        return load_file(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointError(f"{str(directory)!r} has no model.safetensors or pytorch_model.bin")


def add_neutral_mlm_head(bert_dir, out_dir) -> Path:
    """Write ``out_dir``: the BERT encoder of ``bert_dir`` as a ``BertForMaskedLM`` checkpoint
    with the neutral head (see the module docstring); tokenizer files are copied along."""
    from safetensors.torch import save_file
    from transformers import BertConfig

    bert_dir, out_dir = Path(bert_dir), Path(out_dir)
    with open(bert_dir / "config.json") as f:
        raw = json.load(f)
    if raw.get("model_type") != "bert" or "auto_map" in raw:
        kind = raw.get("model_type")
        raise CheckpointError(f"{str(bert_dir)!r} is not a plain BERT checkpoint (model_type {kind!r})")
    config = BertConfig.from_pretrained(bert_dir, trust_remote_code=False)
    state = {}
    for name, tensor in _read_state(bert_dir).items():
        name = name[len("bert."):] if name.startswith("bert.") else name
        if name.startswith(("pooler.", "cls.")) or name.endswith("position_ids"):
            continue
        state["bert." + name] = tensor.contiguous()
    H = config.hidden_size
    state.update({
        "cls.predictions.transform.dense.weight": torch.eye(H),
        "cls.predictions.transform.dense.bias": torch.zeros(H),
        "cls.predictions.transform.LayerNorm.weight": torch.ones(H),
        "cls.predictions.transform.LayerNorm.bias": torch.zeros(H),
        "cls.predictions.bias": torch.zeros(config.vocab_size),
    })
    config.architectures = ["BertForMaskedLM"]
    config.tie_word_embeddings = True
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (bert_dir / name).is_file():
            shutil.copy(bert_dir / name, out_dir / name)
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bert", type=Path, required=True, help="BERT encoder checkpoint directory")
    ap.add_argument("--out", type=Path, required=True, help="where to write the BertForMaskedLM checkpoint")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"wrote {add_neutral_mlm_head(args.bert, args.out)}")


if __name__ == "__main__":
    main()
