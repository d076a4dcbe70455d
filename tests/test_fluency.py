import math

import pytest

from editlab.errors import EditlabError
from editlab.eval.fluency import generation_fluency, ngram_entropy, sample_generations, split_sentences, word_tokenize
from editlab.models import load_lm


def _h(counts):
    total = sum(counts)
    return -sum(c / total * math.log2(c / total) for c in counts)


def test_ngram_entropy_hand_value():
    # words a b a b: bigrams ab ×2, ba ×1; trigrams aba, bab -> 1 bit
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * _h([2, 1]) + 4 / 3 * 1.0) / 2)
    # punctuation is a word: "a , a , a" has bigrams (a ,) ×2 and (, a) ×2, trigrams 2 + 1
    assert ngram_entropy("a, a, a") == pytest.approx((2 / 3 * _h([2, 2]) + 4 / 3 * _h([2, 1])) / 2)
    assert ngram_entropy("word") == 0.0  # no bigram at all


def test_ngram_entropy_keeps_case():
    # "A b a b": bigrams Ab, ba, ab are all distinct (log2 3); lower-casing would merge Ab and ab
    assert ngram_entropy("A b a b") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("A b a b") != pytest.approx(ngram_entropy("a b a b"))


def test_ngram_entropy_rejects_mismatched_weights():
    with pytest.raises(EditlabError):
        ngram_entropy("a b c", ns=(2, 3), weights=(1.0,))


@pytest.mark.parametrize(
    "text, words",
    [
        # nltk.word_tokenize's documented output (sentence split, then Treebank rules)
        ("Good muffins cost $3.88\nin New York.  Please buy me\ntwo of them.\nThanks.",
         ["Good", "muffins", "cost", "$", "3.88", "in", "New", "York", ".", "Please", "buy", "me", "two", "of",
          "them", ".", "Thanks", "."]),
        ("They'll save and invest more.", ["They", "'ll", "save", "and", "invest", "more", "."]),
        ("hi, my name can't hello,", ["hi", ",", "my", "name", "ca", "n't", "hello", ","]),
        ('"We beat some pretty good teams to get here," Slocum said.',
         ["``", "We", "beat", "some", "pretty", "good", "teams", "to", "get", "here", ",", "''", "Slocum", "said", "."]),
        ("There were 300,000, but that wasn't enough.",
         ["There", "were", "300,000", ",", "but", "that", "was", "n't", "enough", "."]),
        ("I cannot go (really) -- wait... why?!",
         ["I", "can", "not", "go", "(", "really", ")", "--", "wait", "...", "why", "?", "!"]),
        ("Danielle Darrieux's mother tongue is French. She lives in the U.S. today.",
         ["Danielle", "Darrieux", "'s", "mother", "tongue", "is", "French", ".", "She", "lives", "in", "the",
          "U.S.", "today", "."]),
    ],
)
def test_word_tokenize_like_nltk(text, words):
    assert word_tokenize(text) == words


def test_sentence_split_spares_abbreviations_and_initials():
    assert split_sentences("Mr. Smith met J. Doe. Then he left.") == ["Mr. Smith met J. Doe.", "Then he left."]


@pytest.fixture(scope="module")
def lm():
    return load_lm("tiny-llama")  # random weights: top-k samples vary from token to token


def test_generation_fluency_is_deterministic_for_a_seed(lm):
    prompts = ["The Eiffel Tower is located in", "Michael Jordan plays", "Toyota was founded in"]
    a = sample_generations(lm, prompts, n_tokens=30, seed=3)
    assert a == sample_generations(lm, prompts, n_tokens=30, seed=3)
    assert a != sample_generations(lm, prompts, n_tokens=30, seed=4)
    assert all(t.startswith(p) and len(t) > len(p) for t, p in zip(a, prompts))  # the prompt is scored too
    scores = generation_fluency(lm, prompts, n_tokens=30, seed=3)
    assert scores == [ngram_entropy(t) for t in a]


def test_n_tokens_counts_the_prompt_as_in_rome(lm):
    # ROME's max_out_len bounds prompt + continuation: a prompt already that long gets nothing added
    prompt = "Michael Jordan plays"
    n_prompt = len(lm.encode_prompt(prompt)) - len(lm.prefix_ids)
    assert sample_generations(lm, [prompt], n_tokens=n_prompt) == [prompt]
    assert sample_generations(lm, [prompt], n_tokens=n_prompt + 5)[0] != prompt


def test_generation_fluency_validates_arguments(lm):
    with pytest.raises(EditlabError):
        generation_fluency(lm, ["a"], n_tokens=0)
    assert generation_fluency(lm, []) == []


def test_sampling_goes_on_past_eos_as_in_rome(lm, monkeypatch):
    # ROME samples to max_out_len whatever is drawn; a text cut at EOS would score lower entropy. Make the
    # second sampled token EOS: plain generation stops there, fluency's sample runs to its full length.
    prompt = "The Eiffel Tower is located in"
    full = lm.generate_ids([prompt], 12, top_k=5, seed=1, stop_at_eos=False)[0]
    assert len(full) == 12

    class Tokenizer:  # the model's tokenizer with another EOS id
        eos_token_id = full[1]

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, *a, **kw):
            return self.inner(*a, **kw)

    monkeypatch.setattr(lm, "tokenizer", Tokenizer(lm.tokenizer))
    stopped = lm.generate_ids([prompt], 12, top_k=5, seed=1)[0]
    assert stopped == full[: full.index(full[1])]
    assert lm.generate_ids([prompt], 12, top_k=5, seed=1, stop_at_eos=False)[0] == full
    n_prompt = len(lm.encode_prompt(prompt)) - len(lm.prefix_ids)
    (text,) = sample_generations(lm, [prompt], n_tokens=n_prompt + 12, seed=1)
    assert text == lm.tokenizer.decode(lm.encode_prompt(prompt)[len(lm.prefix_ids):] + full, skip_special_tokens=True)
