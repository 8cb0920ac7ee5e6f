"""Which grammar library for structured output: xgrammar, llguidance or outlines-core, on this machine.

A 32k byte-level BPE tokenizer is trained locally on Python's own sources (no hub), the size class of real
models' vocabularies. For each library and JSON schema: the one-time tokenizer preparation, the compile time
of the schema, and the cost per generated token of what the engine does each step (compute the allowed-token
mask, then advance by the chosen token), walking the tokens of a valid document for that schema.

    pip install xgrammar outlines-core   # llguidance is a dependency of prefixserve
    python -m bench.bench_grammar
"""

from __future__ import annotations

import json
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

SCHEMAS: dict[str, tuple[dict, dict]] = {
    "small object": (
        {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
            "required": ["name", "age"],
        },
        {"name": "Ada Lovelace", "age": 36},
    ),
    "nested, arrays, enums": (
        {
            "type": "object",
            "properties": {
                "id": {"type": "string", "pattern": "^[a-z]{3}-[0-9]{4}$"},
                "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 5},
                "address": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string"},
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                        "geo": {
                            "type": "array",
                            "items": {"type": "number"},
                            "minItems": 2,
                            "maxItems": 2,
                        },
                    },
                    "required": ["street", "zip", "geo"],
                },
                "active": {"type": "boolean"},
                "notes": {"type": ["string", "null"]},
            },
            "required": ["id", "tags", "address", "active", "notes"],
        },
        {
            "id": "abc-1234",
            "tags": ["red", "blue", "green"],
            "address": {"street": "12 Long Road, Upper Flat", "zip": "90210", "geo": [51.5072, -0.1276]},
            "active": True,
            "notes": None,
        },
    ),
}


def train_tokenizer(vocab_size: int = 32000) -> PreTrainedTokenizerFast:
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))[:1500]
    texts = (p.read_bytes().decode("utf-8", errors="replace") for p in sources)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


def walk(mask_and_advance: Callable[[int], None], tokens: list[int]) -> float:
    """Mean seconds per token of mask + advance over the document's tokens."""
    start = time.perf_counter()
    for t in tokens:
        mask_and_advance(t)
    return (time.perf_counter() - start) / len(tokens)


def bench_llguidance(tok: PreTrainedTokenizerFast, vocab: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    prep = time.perf_counter() - t0
    out = {"prepare_tokenizer_ms": prep * 1e3}
    for name, (schema, doc) in SCHEMAS.items():
        t0 = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False}
        )
        matcher = llguidance.LLMatcher(lltok, grammar)
        bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)  # compiles lazily: count the first mask
        compile_s = time.perf_counter() - t0
        assert not matcher.is_error(), matcher.get_error()
        tokens = tok.encode(json.dumps(doc, separators=(",", ":")))

        def step(t: int, matcher=matcher, bitmask=bitmask) -> None:
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
            assert matcher.consume_token(t), matcher.get_error()

        matcher.reset()
        out[name] = {"compile_ms": compile_s * 1e3, "per_token_us": walk(step, tokens) * 1e6}
    return out


def bench_xgrammar(tok: PreTrainedTokenizerFast, vocab: int) -> dict:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    prep = time.perf_counter() - t0
    out = {"prepare_tokenizer_ms": prep * 1e3}
    for name, (schema, doc) in SCHEMAS.items():
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )
        matcher = xgr.GrammarMatcher(compiled)
        bitmask = xgr.allocate_token_bitmask(1, vocab)
        matcher.fill_next_token_bitmask(bitmask)
        compile_s = time.perf_counter() - t0
        tokens = tok.encode(json.dumps(doc, separators=(",", ":")))

        def step(t: int, matcher=matcher, bitmask=bitmask) -> None:
            matcher.fill_next_token_bitmask(bitmask)
            assert matcher.accept_token(t)

        matcher.reset()
        out[name] = {"compile_ms": compile_s * 1e3, "per_token_us": walk(step, tokens) * 1e6}
    return out


def bench_outlines_core(tok: PreTrainedTokenizerFast, vocab: int) -> dict:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    t0 = time.perf_counter()
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    eos = tok.eos_token_id
    mapping: dict[bytes, list[int]] = {}
    for token, i in tok.get_vocab().items():
        if i != eos:
            mapping.setdefault(bytes(byte_of[c] for c in token), []).append(i)
    vocabulary = Vocabulary(eos, mapping)
    prep = time.perf_counter() - t0
    out = {"prepare_tokenizer_ms": prep * 1e3}
    for name, (schema, doc) in SCHEMAS.items():
        t0 = time.perf_counter()
        index = Index(build_regex_from_schema(json.dumps(schema)), vocabulary)
        guide = Guide(index)
        mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        compile_s = time.perf_counter() - t0
        tokens = tok.encode(json.dumps(doc, separators=(",", ":")))

        def step(t: int, guide=guide, mask=mask) -> None:
            guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
            guide.advance(t)

        guide.reset()
        out[name] = {"compile_ms": compile_s * 1e3, "per_token_us": walk(step, tokens) * 1e6}
    return out


def main() -> None:
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    tok = train_tokenizer()
    vocab = len(tok)
    print(f"tokenizer: byte-level BPE, {vocab} tokens, trained in {time.perf_counter() - t0:.1f} s")
    runs = {"llguidance": bench_llguidance, "xgrammar": bench_xgrammar, "outlines-core": bench_outlines_core}
    for lib, fn in runs.items():
        results = [fn(tok, vocab) for _ in range(3)]  # best of 3 for each figure
        best = {"prepare_tokenizer_ms": min(r["prepare_tokenizer_ms"] for r in results)}
        for name in SCHEMAS:
            best[name] = {k: min(r[name][k] for r in results) for k in ("compile_ms", "per_token_us")}
        line = f"{lib:14s} prepare {best['prepare_tokenizer_ms']:8.1f} ms"
        for name in SCHEMAS:
            line += f" | {name}: compile {best[name]['compile_ms']:8.1f} ms, {best[name]['per_token_us']:7.1f} us/token"
        print(line, flush=True)


if __name__ == "__main__":
    main()
