"""Words in, ids out: reading a run's splits, building its vocabulary and mapping words to ids.

A split is a list of words with `<eos>` closing every line. Directories in the Penn Treebank layout are
read by needle.data.Corpus (whitespace-split lines); the built-in corpus comes from corpus_builtin.
The vocabulary lists words by first use in train, then test, then valid (Corpus's order) and always
holds `<unk>` and `<eos>`.
"""
import collections
import os

from ..data import Corpus
from .config import BUILTIN
from .corpus_builtin import EOS, UNK, builtin_lines, tokenize
from .errors import CLIError, warn

__all__ = ["SPLITS", "read_splits", "check_nonempty", "build_vocab", "prompt_words", "Encoder"]

SPLITS = ("train", "valid", "test")


def read_splits(data, max_lines=None):
    """{"train", "valid", "test"} -> list of words, or None for a valid split the directory lacks.

    `data` is BUILTIN or a directory with train.txt, test.txt and optionally valid.txt.
    """
    if data == BUILTIN:
        return {name: [word for line in lines for word in line + [EOS]]
                for name, lines in builtin_lines(max_lines).items()}
    if not os.path.isdir(data):
        raise CLIError(f"data directory not found: {data}")
    for name in ("train.txt", "test.txt"):
        if not os.path.isfile(os.path.join(data, name)):
            raise CLIError(f"missing file: {os.path.join(data, name)} (a corpus directory needs train.txt "
                           f"and test.txt)")
    try:
        corpus = Corpus(data, max_lines=max_lines)
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot read the corpus in {data}: {e}") from None
    words = corpus.dictionary.idx2word
    splits = {name: getattr(corpus, name) for name in SPLITS}
    return {name: None if ids is None else [words[i] for i in ids] for name, ids in splits.items()}


def check_nonempty(words, data, split):
    """Reject a split that holds nothing but line ends."""
    if not any(word != EOS for word in words):
        where = "the built-in corpus" if data == BUILTIN else os.path.join(data, f"{split}.txt")
        raise CLIError(f"empty corpus: the {split} split of {where} holds no words")


def build_vocab(splits):
    """idx2word: the words of train, test and valid in order of first use, plus `<unk>` and `<eos>`."""
    vocab = {}
    for name in ("train", "test", "valid"):
        for word in splits[name] or ():
            vocab.setdefault(word, len(vocab))
    for word in (UNK, EOS):
        vocab.setdefault(word, len(vocab))
    return list(vocab)


def prompt_words(text, data):
    """Split a prompt the way the run's corpus was split."""
    return tokenize(text) if data == BUILTIN else text.split()


class Encoder:
    """Maps words to ids, sending unknown words to `<unk>` and remembering them for one warning."""

    def __init__(self, idx2word):
        self.word2idx = {word: i for i, word in enumerate(idx2word)}
        self.unk = self.word2idx[UNK]
        self.unknown = collections.Counter()

    def encode(self, words):
        ids = []
        for word in words:
            i = self.word2idx.get(word)
            if i is None:
                self.unknown[word] += 1
                i = self.unk
            ids.append(i)
        return ids

    def warn_unknown(self, shown=5):
        """One warning for everything encoded so far (how many unknown words, and the first few)."""
        if not self.unknown:
            return
        first = ", ".join(repr(word) for word in list(self.unknown)[:shown])
        more = ", ..." if len(self.unknown) > shown else ""
        kinds, count = len(self.unknown), sum(self.unknown.values())
        warn(f"{kinds} unknown word{'s' * (kinds != 1)} ({count} occurrence{'s' * (count != 1)}) mapped to "
             f"{UNK}: {first}{more}")
        self.unknown.clear()
