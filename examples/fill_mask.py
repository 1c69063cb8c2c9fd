"""Fill-mask with transformers' pipeline on an SGLang-backed masked LM.

    python examples/fill_mask.py                       # small random-weight model built locally
    python examples/fill_mask.py --model PATH_OR_ID    # a local directory or a Hub id (BERT, RoBERTa,
                                                       # XLM-R, CamemBERT), as transformers resolves it

Without --model the script builds a small random-weight RoBERTa from the roberta-base config
in data/ (so the predictions are nonsense words, but it runs anywhere in well under a minute) and
checks that the answers equal transformers' own model on the same weights.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SGLANG_HF_BRIDGE_DATA", REPO / "data"))
TOKENIZER_DIR = DATA / "tokenizers" / "roberta-base"
DEFAULT_TOKENIZER = TOKENIZER_DIR
SENTENCES = [
    "The movie was <mask>.",
    "Paris is the <mask> of France.",
    "I <mask> this film and the acting was <mask>.",
]


def build_small_model(tokenizer_dir: Path) -> Path:
    """Random-weight 4-layer RoBERTa with the real vocabulary, saved to a temp dir."""
    import torch
    from transformers import RobertaConfig, RobertaForMaskedLM

    config = RobertaConfig.from_pretrained(str(tokenizer_dir))
    config.update(dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024))
    torch.manual_seed(0)
    path = Path(tempfile.mkdtemp(prefix="sglang-hf-bridge-example-"))
    RobertaForMaskedLM(config).save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="masked-LM checkpoint: a local directory or a Hugging Face Hub id")
    ap.add_argument("--tokenizer", help="tokenizer directory or Hub id (default: --model, else the RoBERTa "
                                        "tokenizer in data/)")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--no-compare", action="store_true", help="skip the check against transformers' own model")
    ap.add_argument("sentences", nargs="*", help="sentences with <mask> (default: three examples)")
    args = ap.parse_args()

    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    from sglang_hf_bridge import SGLangAutoModelForMaskedLM

    model_dir = args.model or build_small_model(DEFAULT_TOKENIZER)
    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer or (args.model if args.model else DEFAULT_TOKENIZER)))
    sentences = args.sentences or [s.replace("<mask>", tokenizer.mask_token) for s in SENTENCES]

    t0 = time.perf_counter()
    model = SGLangAutoModelForMaskedLM.from_pretrained(model_dir, device=args.device)
    print(f"loaded {model_dir} on SGLang ({model.device}) in {time.perf_counter() - t0:.1f} s")
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer)
    results = fill(sentences, top_k=args.top_k)
    if len(sentences) == 1:  # the pipeline returns one sentence's answers unwrapped
        results = [results]
    for sentence, result in zip(sentences, results):
        print(f"\n{sentence}")
        per_mask = result if isinstance(result[0], list) else [result]
        for i, candidates in enumerate(per_mask):
            shown = ", ".join(f"{c['token_str'].strip()!r} {c['score']:.4f}" for c in candidates)
            print(f"  mask {i}: {shown}")

    if not args.no_compare:
        reference = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
        expected = pipeline("fill-mask", model=reference, tokenizer=tokenizer)(sentences, top_k=args.top_k)
        expected = [expected] if len(sentences) == 1 else expected
        same = _same(results, expected)
        print(f"\nsame tokens and scores (1e-5) as transformers' {type(reference).__name__}: {same}")
        if not same:
            raise SystemExit(1)
    model.close()


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a["token"] == b["token"] and abs(a["score"] - b["score"]) <= 1e-5
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


if __name__ == "__main__":
    main()
