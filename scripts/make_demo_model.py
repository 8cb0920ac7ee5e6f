"""Build the built-in demo model shipped in `server/prefixserve/demo/model/`.

A small GPT-2-shaped model with random weights (fixed seed) and a byte-level BPE tokenizer trained on
`scripts/demo_corpus.txt`. Everything is made locally, so the demo needs no network. Rerun to rebuild:

    python scripts/make_demo_model.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "server" / "prefixserve" / "demo" / "model"
CORPUS = ROOT / "scripts" / "demo_corpus.txt"
EOS = "<|endoftext|>"
# ChatML-style template so /v1/chat/completions works out of the box on the demo model.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(CORPUS)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main() -> None:
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=1024,
        n_embd=64,
        n_layer=4,
        n_head=4,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config).eval()
    if OUT.exists():
        shutil.rmtree(OUT)
    model.save_pretrained(OUT)
    tokenizer.save_pretrained(OUT)
    print(f"wrote {OUT}: {sum(p.numel() for p in model.parameters())} parameters, vocab {len(tokenizer)}")


if __name__ == "__main__":
    main()
