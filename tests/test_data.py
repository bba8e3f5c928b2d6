"""Offline corpora: each loads by name, is verified, and splits deterministically."""

from __future__ import annotations

import hashlib
import os

import pytest

from lmkit import data


def test_every_corpus_is_listed_with_a_licence():
    names = [c.name for c in data.list_corpora()]
    assert names == ["kjv", "tang", "tinyshakespeare"]
    for corpus in data.list_corpora():
        assert corpus.licence and corpus.source and corpus.language


def test_kjv_is_the_king_james_bible():
    text = data.load_corpus("kjv")
    assert text.startswith("GENESIS\nIn the beginning God created the heaven and the earth.\n")
    assert 4_000_000 < len(text) < 4_500_000
    assert "REVELATION" in text


def test_tang_is_simplified_chinese_poetry():
    text = data.load_corpus("tang")
    assert text.count("\n\n") + 1 == 7418
    assert "萧晨骑马出皇都" in text  # converted from 蕭晨騎馬出皇都
    assert "蕭" not in text[:200]
    for char in "我喜欢编程":
        assert char in text


def test_joined_corpora():
    both = data.load_corpus("kjv+tang")
    assert both == data.load_corpus("kjv") + "\n" + data.load_corpus("tang")


def test_joined_corpora_are_split_part_by_part():
    train, val = data.load_splits("kjv+tang")
    kjv_train, kjv_val = data.train_val_split(data.load_corpus("kjv"))
    tang_train, tang_val = data.train_val_split(data.load_corpus("tang"))
    assert train == kjv_train + "\n" + tang_train and val == kjv_val + "\n" + tang_val
    assert data.load_splits("kjv") == (kjv_train, kjv_val)


def test_unknown_corpus_lists_the_known_ones():
    with pytest.raises(data.CorpusError) as err:
        data.load_corpus("wikipedia")
    message = str(err.value)
    assert "'wikipedia'" in message
    for name in ("kjv", "tang", "tinyshakespeare"):
        assert name in message


@pytest.mark.skipif(not os.environ.get("LMKIT_DATA"), reason="needs LMKIT_DATA=../shared/data")
def test_tinyshakespeare_from_lmkit_data_is_verified():
    text = data.load_corpus("tinyshakespeare")
    assert hashlib.sha256(text.encode()).hexdigest() == data.TINYSHAKESPEARE_SHA256
    assert text.startswith("First Citizen:")


def test_tinyshakespeare_rejects_a_corrupt_file(tmp_path, monkeypatch):
    (tmp_path / "tinyshakespeare.txt").write_text("To be, or not to be\n")
    monkeypatch.setenv("LMKIT_DATA", str(tmp_path))
    data.load_corpus.cache_clear()
    try:
        with pytest.raises(data.CorpusError, match="sha256"):
            data.load_corpus("tinyshakespeare")
    finally:
        data.load_corpus.cache_clear()


def test_tinyshakespeare_offline_error_names_both_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("LMKIT_DATA", str(tmp_path))  # empty directory
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    data.load_corpus.cache_clear()
    try:
        with pytest.raises(data.CorpusError) as err:
            data.load_corpus("tinyshakespeare")
    finally:
        data.load_corpus.cache_clear()
    assert "LMKIT_DATA" in str(err.value) and data.TINYSHAKESPEARE_URL in str(err.value)


def test_split_is_positional_deterministic_and_on_line_boundaries():
    text = "".join(f"line {i}\n" for i in range(1000))
    train, val = data.train_val_split(text, 0.1)
    assert train + val == text
    assert train.endswith("\n") and val.startswith("line ")
    assert abs(len(val) / len(text) - 0.1) < 0.01
    assert data.train_val_split(text, 0.1) == (train, val)
    with pytest.raises(ValueError):
        data.train_val_split(text, 1.5)


def test_the_book_states_every_corpus_and_its_licence():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "book" / "tools.md").read_text(encoding="utf-8")
    for corpus in data.list_corpora():
        row = next((line for line in page.splitlines() if line.startswith(f"| `{corpus.name}` |")), None)
        assert row is not None, f"book/tools.md has no row for corpus {corpus.name!r}"
        assert "public domain" in row and "public domain" in corpus.licence
