"""Tiny, offline stand-ins for real checkpoints and datasets: for the quick starts, the recipes' `--tiny` mode and
the tests. Nothing here downloads anything; everything is reproducible from a seed.

- `tiny_tokenizer()`: a character-level `PreTrainedTokenizerFast` (lower-case letters, space, full stop) with
  BOS/EOS/PAD/UNK and a minimal chat template.
- `tiny_corpus(n)`: sentences from a fixed random "language": a sparse word-bigram Markov chain whose words are
  random letter strings. Spelling inside a word is deterministic and the choice of the next word is random, so a
  drafter has both easy and hard tokens to learn, and the target's distribution has real entropy.
- `tiny_llama(...)`: a randomly initialised Llama-architecture model of any small size.
"""

from __future__ import annotations

import random
import string

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
CHARACTERS = string.ascii_lowercase + " ."
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'][0] }} {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}a {% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: 4 special tokens + 26 letters + space + '.' = 32 ids."""
    from tokenizers import Tokenizer, decoders, models, processors

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    vocab.update({char: len(vocab) + i for i, char in enumerate(CHARACTERS)})
    # BPE without merges splits text into single characters; Fuse joins them back without spaces.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.decoder = decoders.Fuse()
    bos = SPECIAL_TOKENS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


class TinyLanguage:
    """A sparse word-bigram Markov chain over random letter-string words (see the module docstring)."""

    def __init__(self, num_words: int = 24, successors_per_word: int = 3, seed: int = 0):
        rng = random.Random(seed)
        words: set[str] = set()
        while len(words) < num_words:
            words.add("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 5))))
        self.words = sorted(words)
        self.transitions = {}
        for word in self.words:
            successors = rng.sample(self.words, successors_per_word)
            weights = [rng.random() ** 2 + 0.05 for _ in successors]  # skewed, so there is a mode to find
            self.transitions[word] = (successors, weights)

    def sentence(self, rng: random.Random, min_words: int = 5, max_words: int = 10) -> str:
        word = rng.choice(self.words)
        words = [word]
        for _ in range(rng.randint(min_words, max_words) - 1):
            successors, weights = self.transitions[word]
            word = rng.choices(successors, weights)[0]
            words.append(word)
        return " ".join(words) + "."


def tiny_corpus(num_rows: int, seed: int = 0, language_seed: int = 0, prompt_words: int = 2) -> list[dict[str, str]]:
    """`num_rows` rows `{"prompt", "completion", "text"}`: the first `prompt_words` words are the prompt.

    `language_seed` fixes the language (keep it equal across train and held-out splits); `seed` draws sentences.
    """
    language = TinyLanguage(seed=language_seed)
    rng = random.Random(seed + 1_000_003 * language_seed + 1)
    rows = []
    for _ in range(num_rows):
        text = language.sentence(rng)
        words = text.split(" ")
        prompt = " ".join(words[:prompt_words])
        rows.append({"prompt": prompt, "completion": text[len(prompt) :], "text": text})
    return rows


def tiny_llama(
    vocab_size: int = 32,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 64,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> LlamaForCausalLM:
    """A randomly initialised Llama of the given size (deterministic in `seed`), wired to `tokenizer`'s ids."""
    special = {}
    if tokenizer is not None:
        special = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        **special,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
