"""Build a tiny random-weight Llama that vLLM's CPU backend serves in about a minute (`make vllm`).

Run with the vLLM venv's interpreter (it has torch, transformers and tokenizers):
``.venv-vllm/bin/python tests/vllm/make_tiny_llama.py OUT_DIR``. Nothing is downloaded:
the tokenizer is a word-level one built here. Its vocabulary holds the words the load
generator's chat prompts use (so chat prompts are real tokens, not <unk>), filler words
up to 4096 entries, specials at both ends (<unk> <s> </s> at 0-2, <|pad|> at 4095), so
token-id prompts must stay below 4096 and clear of the specials.

Shape: 2 layers, hidden 256, 4 attention heads of 64 (vLLM's CPU attention refuses a
head size of 16), 2 KV heads, 2048 positions.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

VOCAB_SIZE = 4096


def chat_words() -> list[str]:
    """The load generator's chat words, read from its source (this interpreter lacks its dependencies)."""
    source = Path(__file__).resolve().parents[2] / "pytest_infmax" / "load" / "scenarios.py"
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_WORDS" for t in node.targets):
            return str(ast.literal_eval(node.value.func.value)).split()  # type: ignore[attr-defined]
    raise SystemExit(f"no _WORDS in {source}")


def build(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = list(dict.fromkeys(chat_words()))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in words:
        vocab[word] = len(vocab)
    while len(vocab) < VOCAB_SIZE - 1:
        vocab[f"w{len(vocab)}"] = len(vocab)
    vocab["<|pad|>"] = VOCAB_SIZE - 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<|pad|>"
    )
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=VOCAB_SIZE - 1,
        torch_dtype="float32",
    )
    LlamaForCausalLM(config).save_pretrained(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    build(Path(sys.argv[1]))
