"""The toy models' word-level tokenizer: a real HuggingFace tokenizer, saved as JSON.

One token per word (split on whitespace), ``<bos>`` prepended by the tokenizer itself, ``<unk>``
for words outside the vocabulary. ``model.to_tokens`` and ``model.to_str_tokens`` work as with any
HuggingFace model.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast

BOS = "<bos>"
UNK = "<unk>"
SPECIALS = (BOS, UNK)
# 38 short, distinct animal names: readable labels ("current token = fox") in every table
WORDS = (
    "ant ape bat bee boar cat cod cow crab crow deer dog duck eel elk emu fox frog gnu goat hare "
    "hen ibis jay koi lark lion mole moth newt owl pig rat seal toad vole wolf yak"
).split()


def build_tokenizer(
    directory: str | Path, words: tuple[str, ...] = WORDS
) -> PreTrainedTokenizerFast:
    """Write the tokenizer files (tokenizer.json, tokenizer_config.json) to ``directory``: ids
    0 and 1 are the specials, then ``words`` in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = token_ids(words)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=BOS,
        pad_token=BOS,
        unk_token=UNK,
        add_bos_token=True,
    )
    hf.save_pretrained(str(directory))
    return load_tokenizer(directory)


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Load the saved tokenizer (local files only; no download)."""
    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory}")
    return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)


def token_ids(words: tuple[str, ...] = WORDS) -> dict[str, int]:
    """Every token's id: the specials first, then ``words`` in order."""
    return {token: i for i, token in enumerate((*SPECIALS, *words))}


def vocab_size(words: tuple[str, ...] = WORDS) -> int:
    return len(SPECIALS) + len(words)
