"""Generic text for covariance statistics.

Default: the English Wikipedia sample that ships in the gensim wheel (100 articles, MediaWiki XML),
cleaned of markup once and cached as plain text. A `.txt` file or a `.jsonl` file (one object per line
with a "text" field) can be given instead.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataFormatError, ModelNotFoundError
from ..paths import cache_dir

CLEANER_VERSION = 1  # bump when clean_wikitext changes: it is part of the statistics cache key
WIKI_SAMPLE = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


@dataclass(frozen=True)
class Corpus:
    name: str  # stable identifier used in cache keys
    texts: tuple[str, ...]
    cleaner: int | None = None  # CLEANER_VERSION the texts were cleaned with (None: used as given)


def _strip_nested(text: str, open_: str, close: str) -> str:
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


_LINK = re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]")


def clean_wikitext(text: str) -> str:
    """Plain prose from MediaWiki markup: templates, tables, refs, files, tags and headings removed."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref.*?</ref>", "", text, flags=re.S)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    text = re.sub(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text)
    text = _LINK.sub(r"\1", text)
    text = re.sub(r"\[https?://\S+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = text.replace("&nbsp;", " ").replace("&ndash;", "–").replace("&mdash;", "—")
    paras = []
    for line in text.split("\n"):
        line = line.strip()
        if not line or line.startswith(("=", "*", "#", "|", "!", ":", ";", "{", "}")):
            continue
        if len(line) < 40:
            continue
        paras.append(re.sub(r"\s{2,}", " ", line))
    return "\n".join(paras)


def _wiki_sample_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        import sys  # local: this function is the only part of the module that names the interpreter

        # gensim is a declared dependency (its wheel carries the sample): absent means a broken install.
        raise ModelNotFoundError(
            f"the default corpus ships in the gensim wheel, which is missing; run: {sys.executable} -m pip install 'gensim>=4.4,<5'"
        )
    path = Path(list(spec.submodule_search_locations)[0]).parent / WIKI_SAMPLE
    if not path.exists():
        raise ModelNotFoundError(f"gensim is installed but its Wikipedia sample is missing: {path}")
    return path


def wikipedia_sample() -> Corpus:
    """The cleaned gensim Wikipedia sample (cached as text after the first call, per cleaner version)."""
    src = _wiki_sample_path()
    version = CLEANER_VERSION  # read at call time: text cleaned by another version is another corpus
    cached = cache_dir("corpora") / f"enwiki-sample-c{version}.txt"
    if not cached.exists():
        raw = bz2.decompress(src.read_bytes()).decode("utf-8", errors="replace")
        articles = re.findall(r"<text[^>]*>(.*?)</text>", raw, flags=re.S)
        import html

        docs = [clean_wikitext(html.unescape(a)) for a in articles]
        docs = [d for d in docs if len(d) > 200 and not d.lower().startswith("#redirect")]
        tmp = cached.with_suffix(".tmp")
        tmp.write_text("\n\n".join(docs), encoding="utf-8")
        tmp.replace(cached)
    text = cached.read_text(encoding="utf-8")
    return Corpus("enwiki-sample", tuple(t for t in text.split("\n\n") if t.strip()), cleaner=version)


def file_corpus(path: str | Path) -> Corpus:
    """A `.txt` file (documents separated by blank lines) or `.jsonl` file (field "text")."""
    p = Path(path)
    if not p.is_file():
        raise DataFormatError(f"corpus file not found: {p}")
    data = p.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:16]
    text = data.decode("utf-8", errors="replace")
    if p.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                docs.append(str(obj["text"]))
            except (ValueError, KeyError, TypeError):
                raise DataFormatError(f"{p}: line {n} is not a JSON object with a 'text' field") from None
    else:
        docs = [d for d in re.split(r"\n\s*\n", text) if d.strip()]
    if not docs:
        raise DataFormatError(f"corpus file {p} holds no text")
    return Corpus(f"file:{p.name}:{digest}", tuple(docs))


def get_corpus(spec: str | Path | None = None) -> Corpus:
    if spec is None or str(spec) in ("wikipedia", "enwiki-sample", "default"):
        return wikipedia_sample()
    return file_corpus(spec)
