"""Llama-shaped random-weight checkpoints for the CPU speed comparison, at two sizes (--size):

  360m   hidden 960, 32 layers, 15 heads, 5 KV heads, intermediate 2560, tied embeddings (SmolLM2-360M's shape
         with a Llama-2-sized vocabulary; ~345M parameters)
  1.1b   hidden 2048, 22 layers, 32 heads, 4 KV heads, intermediate 5632, untied embeddings (TinyLlama-1.1B's
         shape; ~1.1B parameters)

vocabulary 32000, float32 safetensors. The tokenizer is a small SentencePiece
model trained here on the project's own text (llama.cpp's converter reads tokenizer.model and pads the
vocabulary to 32000; edgellm reads the tokenizer.json written beside it). Speed does not depend on the
weights' values. Runs in .venv-bench (torch, transformers, sentencepiece; bench/setup_comparisons.sh).

    .venv-bench/bin/python bench/make_random_llama.py [--size 360m|1.1b] [-o .cache/bench/llama-SIZE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 32000
SHAPES = {
    "360m": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                 intermediate_size=2560, tie_word_embeddings=True),
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 intermediate_size=5632, tie_word_embeddings=False),
}


def make(out: Path, size: str = "360m") -> Path:
    import sentencepiece as spm
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join((ROOT / "build_engine" / "data" / f"{n}.txt").read_text() for n in ("calibration", "heldout"))
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(text)
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=1000,
                                       model_type="unigram", hard_vocab_limit=False, bos_id=1, eos_id=2, unk_id=0,
                                       pad_id=-1)
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    # Filler pieces up to the model's vocabulary, so that every token id the benchmark sends is valid.
    pieces += [(f"<filler{i}>", -100.0) for i in range(len(pieces), VOCAB)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                           "eos_token": "</s>", "unk_token": "<unk>"}))
    config = transformers.LlamaConfig(**SHAPES[size], vocab_size=VOCAB, max_position_embeddings=8192,
                                      rms_norm_eps=1e-5, rope_theta=100000.0, bos_token_id=1, eos_token_id=2,
                                      torch_dtype="float32")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {n / 1e6:.0f}M parameters")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SHAPES), default="360m")
    ap.add_argument("-o", "--output", help="default: .cache/bench/llama-SIZE")
    args = ap.parse_args()
    make(Path(args.output or ROOT / ".cache" / "bench" / f"llama-{args.size}"), args.size)


if __name__ == "__main__":
    main()
