"""The built-in corpus: the text of Python's documentation topics (`pydoc_data.topics`).

Every topic is cut into paragraphs (runs of non-blank lines); paragraphs are numbered across the topics
in sorted order, and paragraph k goes to valid if k % 10 == 8, to test if k % 10 == 9, else to train.
Lines are lowercased and split into words, numbers and single punctuation marks; heading underlines
("*****", "=====") are dropped. Words seen fewer than MIN_COUNT times in the (whole) train split
become `<unk>`, in every split, so the vocabulary holds only words the model can learn.
"""
import collections
import re

__all__ = ["EOS", "UNK", "MIN_COUNT", "tokenize", "builtin_lines"]

EOS, UNK = "<eos>", "<unk>"
MIN_COUNT = 3

_TOKEN = re.compile(r"[a-z0-9_]+|[^\sa-z0-9_]")
_UNDERLINE = re.compile(r"^\s*([^\w\s])\1{2,}\s*$")


def tokenize(text):
    """Lowercased words, numbers and single punctuation marks of one line of text."""
    return _TOKEN.findall(text.lower())


def _paragraphs():
    from pydoc_data.topics import topics  # lazy: a 1 MB module, loaded only when the corpus is used

    for name in sorted(topics):
        paragraph = []
        for line in topics[name].splitlines():
            if not line.strip():
                if paragraph:
                    yield paragraph
                paragraph = []
            elif not _UNDERLINE.match(line):
                paragraph.append(tokenize(line))
        if paragraph:
            yield paragraph


def builtin_lines(max_lines=None):
    """{"train", "valid", "test"} -> list of lines, each a list of words (rare words already `<unk>`).

    `max_lines` keeps the first lines of each split; the rare-word threshold is counted on the whole
    train split, so the vocabulary does not depend on it.
    """
    splits = {"train": [], "valid": [], "test": []}
    for k, paragraph in enumerate(_paragraphs()):
        splits["valid" if k % 10 == 8 else "test" if k % 10 == 9 else "train"].extend(paragraph)
    counts = collections.Counter(word for line in splits["train"] for word in line)
    known = {word for word, n in counts.items() if n >= MIN_COUNT}
    return {name: [[word if word in known else UNK for word in line] for line in lines[:max_lines]]
            for name, lines in splits.items()}
