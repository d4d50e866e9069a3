"""A tiny random-weight Llama in HuggingFace layout that real vLLM and Modular MAX both serve.

    <engine venv>/bin/python tests/servers/tinyhf.py OUT_DIR     # writes the model into OUT_DIR

Run with the vLLM venv's interpreter (``tests/servers/enginebuild.py`` does): ``transformers``,
``tokenizers`` and ``torch`` come with vLLM, and nothing is downloaded. The model:

- ``LlamaConfig`` with a head size of 32: vLLM's CPU attention accepts only head sizes 32, 64,
  80, … 512 (16 fails); 2 layers, 4 query and 2 KV heads, about 230k parameters, float32;
- a byte-level BPE tokenizer trained here on a few sentences (any text encodes), wrapped in
  ``PreTrainedTokenizerFast`` with a ``chat_template`` so ``/v1/chat/completions`` works.

The text it generates is random, as expected of random weights; streaming, usage and ``[DONE]``
are the engines' own. Seeds are fixed, so the same files come out on every machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
TEXT = [
    "Say hello.",
    "Hello! How can I help you today?",
    "The quick brown fox jumps over the lazy dog.",
    "A node serves the models its file declares, no more and no less.",
    "Tiny models answer fast on a CPU, with random words.",
    "What is the capital of France? Paris is the capital of France.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000",
]
VOCAB = 384


def write_tiny_hf(out: Path) -> None:
    """Write config, weights, generation config and tokenizer files into ``out``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(TEXT, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIALS[3:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 2048
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python tests/servers/tinyhf.py OUT_DIR", file=sys.stderr)
        sys.exit(2)
    write_tiny_hf(Path(sys.argv[1]))
