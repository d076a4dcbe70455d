"""Generation fluency as the ROME paper measures it (after Zhang et al. 2018).

For each generation prompt ROME samples one text with top-k 5 sampling until prompt + continuation
are 100 tokens long (an EOS token does not stop it), decodes the *whole* sequence (prompt included), word-tokenizes it with
`nltk.word_tokenize` (case kept) and scores it with the weighted n-gram entropy
    H_n = −Σ f_n log2 f_n  (f_n: relative frequencies of the text's word n-grams),
    fluency = mean(2/3 · H_2, 4/3 · H_3).
A record's fluency is the arithmetic mean over its prompts. Repetitive text scores low.

`word_tokenize` re-implements the Penn-Treebank rules of nltk's word tokenizer with regular
expressions (no nltk dependency); nltk first splits sentences with its trained Punkt model, which is
approximated here by a rule (a period-final word ends a sentence unless it is a known abbreviation,
an initial, or a number before a lower-case word). Sentence ends only decide whether a word's final
period is split off ("them." → "them", ".").

ROME's TF-IDF "reference consistency" needs its Wikipedia attribute snippets and IDF tables, which the
shipped CounterFact data do not include, so it is not implemented.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from typing import TYPE_CHECKING, Sequence

from ..errors import EditlabError

if TYPE_CHECKING:
    from ..models.lm import LM

# ------------------------------------------------------------------ sentence split (Punkt stand-in)
# Common English abbreviations that Punkt's English model does not treat as sentence ends.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc inc ltd co corp dept gen gov sen rep col lt sgt capt "
    "jan feb mar apr jun jul aug sep sept oct nov dec approx fig al".split()
)
_PERIOD_WORD = re.compile(r"(\S*?)\.([\"')\]}»”’]*)(\s+)(?=(\S))")


def _sentence_end(word: str, following: str) -> bool:
    """Whether a word that ends in a period (given without it) ends a sentence before `following`."""
    bare = word.lstrip("\"'([{«“‘`")
    if not bare or bare.endswith("."):  # ellipses are split off by the word rules anyway
        return False
    if "." in bare or bare.lower() in _ABBREVIATIONS:  # U.S., e.g., Mr.
        return False
    if len(bare) == 1 and bare.isalpha():  # an initial: "J. Smith"
        return False
    if bare.replace(",", "").isdigit() and following[:1].islower():  # "in 1990. and ..."
        return False
    return True


def split_sentences(text: str) -> list[str]:
    sentences, start = [], 0
    for m in _PERIOD_WORD.finditer(text):
        if _sentence_end(m.group(1), text[m.end():m.end() + 1]):
            sentences.append(text[start : m.start(3)])
            start = m.end(3)
    sentences.append(text[start:])
    return [s for s in sentences if s.strip()]


# ------------------------------------------------------------------ Treebank word rules
_Rule = tuple[re.Pattern[str], str]


def _rules(*pairs: tuple[str, str]) -> list[_Rule]:
    return [(re.compile(p), r) for p, r in pairs]


# Applied in this order to one sentence; tokens are then the whitespace-separated pieces. The rules are
# those of nltk 3.6.5, the version ROME's environment pins (later versions also split dashes).
_OPENING = _rules(
    (r"([«“‘„]|`+)", r" \1 "),  # opening quotes stand alone
    (r'^"', "``"),  # a straight double quote opening the sentence
    (r"(``)", r" \1 "),
    (r"([ (\[{<])(\"|'')", r"\1 `` "),  # ... or following a space/bracket
    (r"(?i)(')(?!re|ve|ll|m|t|s|d|n)(\w)\b", r"\1 \2"),  # a single quote before a lone letter
)
_PUNCT = _rules(
    (r"([^.])(\.)([\]\)}>\"'»”’ ]*)\s*$", r"\1 \2 \3 "),  # the sentence's final period
    (r"([:,])([^\d])", r" \1 \2"),  # commas and colons, except inside numbers (3,000; 10:30)
    (r"([:,])$", r" \1 "),
    (r"\.{2,}", r" \g<0> "),  # ellipses
    (r"[;@#$%&]", r" \g<0> "),
    (r"([^.])(\.)([\]\)}>\"']*)\s*$", r"\1 \2\3 "),
    (r"[?!]", r" \g<0> "),
    (r"([^'])' ", r"\1 ' "),  # a closing single quote
    (r"[*]", r" \g<0> "),
    (r"[\]\[(){}<>]", r" \g<0> "),  # brackets
    (r"--", r" -- "),
)
_CLOSING = _rules(  # run on " sentence " (padded) so that clitics at the end are seen
    (r"([»”’])", r" \1 "),
    (r'"', " '' "),  # other straight double quotes close
    (r"(\S)('')", r"\1 \2 "),
    (r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 "),  # clitics: John 's, I 'm, she 'd
    (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 "),  # they 'll, ca n't
)
_SPLIT_WORDS = [  # fused words split in two (MacIntyre's list as used by the Treebank tokenizer)
    re.compile(p)
    for p in (r"(?i)\b(can)(not)\b", r"(?i)\b(d)('ye)\b", r"(?i)\b(gim)(me)\b", r"(?i)\b(gon)(na)\b",
              r"(?i)\b(got)(ta)\b", r"(?i)\b(lem)(me)\b", r"(?i)\b(more)('n)\b", r"(?i)\b(wan)(na)(?=\s)",
              r"(?i) ('t)(is)\b", r"(?i) ('t)(was)\b")
]


def _sentence_words(sentence: str) -> list[str]:
    s = sentence
    for pat, rep in _OPENING + _PUNCT:
        s = pat.sub(rep, s)
    s = f" {s} "
    for pat, rep in _CLOSING:
        s = pat.sub(rep, s)
    for pat in _SPLIT_WORDS:
        s = pat.sub(r" \1 \2 ", s)
    return s.split()


def word_tokenize(text: str) -> list[str]:
    """Words and punctuation of `text` as nltk.word_tokenize gives them (case kept)."""
    return [w for sent in split_sentences(text) for w in _sentence_words(sent)]


# ------------------------------------------------------------------ entropy
def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's weighted n-gram entropy (bits) of one text: mean over n of weight_n · H_n."""
    if len(ns) != len(weights) or not ns:
        raise EditlabError(f"ngram_entropy needs one weight per n; got ns={list(ns)}, weights={list(weights)}")
    words = word_tokenize(text)
    values = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum((c / total) * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(w * h)
    return sum(values) / len(values)


# ------------------------------------------------------------------ generation
def _clean(text: str) -> str:
    # as ROME post-processes its decoded samples
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ").replace("<|endoftext|>", "")


def sample_generations(lm: LM, prompts: Sequence[str], n_tokens: int = 100, top_k: int = 5, seed: int = 0) -> list[str]:
    """One top-k sample per prompt, as the text ROME scores: prompt + continuation, where the
    continuation brings the prompt's tokens (text tokens and tokenizer specials such as BOS, not
    editlab's sink prefix) to `n_tokens` in all (ROME's `max_out_len`). Deterministic for `seed`."""
    if n_tokens < 1 or top_k < 1:
        raise EditlabError(f"fluency needs n_tokens >= 1 and top_k >= 1; got n_tokens={n_tokens}, top_k={top_k}")
    if not prompts:
        return []
    budgets = [max(0, n_tokens - (len(lm.encode_prompt(p)) - len(lm.prefix_ids))) for p in prompts]
    # one batched call: a sample of the longest budget cut at a shorter budget is a sample of that length
    # no stop at EOS (ROME's generate_fast runs to max_out_len): a text cut at EOS would score lower entropy
    conts = lm.generate_ids(list(prompts), max(1, max(budgets)), top_k=top_k, seed=seed, stop_at_eos=False)
    texts = []
    for p, cont, b in zip(prompts, conts, budgets):
        # decode prompt and continuation together, as ROME does: decoding the continuation alone
        # would drop its leading space under SentencePiece tokenizers
        ids = lm.encode_prompt(p)[len(lm.prefix_ids) :] + cont[:b]
        texts.append(_clean(lm.tokenizer.decode(ids, skip_special_tokens=True)))
    return texts


def generation_fluency(lm: LM, prompts: Sequence[str], n_tokens: int = 100, top_k: int = 5,
                       seed: int = 0) -> list[float]:
    """ROME's fluency (weighted bi/tri-gram entropy) of one sampled text per prompt; average the
    values of a record's generation prompts to get its fluency."""
    return [ngram_entropy(t) for t in sample_generations(lm, prompts, n_tokens, top_k, seed)]
