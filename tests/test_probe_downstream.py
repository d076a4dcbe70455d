"""The `downstream` probe: its scoring rules on hand-computed cases, reading the MEH task files (row
counts per budget, errors that name file, line and field), the probe end to end on a tiny model
(classification scores equal a manual comparison of the option scores; MEH's variant equals a parse of
greedy one-token generation) and, marked slow, the unedited SmolLM2 values against spec section 3.3."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from editlab.models import load_lm
from editlab.probes import downstream as ds
from editlab.probes.base import ProbeError
from editlab.probes.downstream import (Downstream, first_number, gsm8k_extract_correct, gsm8k_meh_correct,
                                       majority_rate, meh_parse, span_match)

# ----------------------------------------------------------------------------- scoring rules


def test_span_match_is_squad_normalised_and_needs_a_whole_word_span():
    assert span_match("The answer is The Beatles!", ["beatles"])  # case, article, punctuation dropped
    assert span_match("It was Wilhelm Conrad Röntgen, in 1901", ["Wilhelm Conrad Röntgen"])
    assert span_match("on May 18, 2018 in cinemas", ["May 18 , 2018"])  # the data's spaced commas normalise away
    assert not span_match("Beatlemania swept", ["Beatles"])  # part of a word is not a span
    assert not span_match("Conrad Wilhelm", ["Wilhelm Conrad"])  # order matters
    assert not span_match("the", ["The"])  # a gold that normalises to nothing never matches
    assert span_match("Paris or Rome", ["London", "rome"])  # any gold, counted once


def test_gsm8k_first_number_rule_against_meh_substring_rule():
    assert first_number("18.") == 18 and first_number(" 1,800 dollars") == 1800 and first_number("no digits") is None
    assert first_number("-3 apples") == -3 and first_number("$2.50 each") == pytest.approx(2.5)
    # (output, gold) -> (first-number rule, substring rule)
    cases = {
        (" 18.", "18"): (True, True),
        (" 1,800", "1800"): (True, False),   # commas removed for the first number only
        (" The answer is 18", "18"): (True, True),
        (" 180", "18"): (False, True),       # MEH's substring rule accepts a longer number
        (" 3 or 18", "18"): (False, True),   # only the first number counts
        (" eighteen", "18"): (False, False),
        (" 18.0", "18"): (True, True),       # compared as numbers
        (" 17.5", "18"): (False, False),
    }
    for (out, gold), (extract, meh) in cases.items():
        assert gsm8k_extract_correct(out, gold) is extract, (out, gold)
        assert gsm8k_meh_correct(out, gold) is meh, (out, gold)


def test_meh_parse_follows_each_task_rule():
    assert meh_parse("sst2", " positive") == 0
    assert meh_parse("sst2", " Negative") == 1
    assert meh_parse("sst2", " neutral") is None
    assert meh_parse("rte", " TRUE") == 0 and meh_parse("rte", " false") == 1 and meh_parse("rte", " yes") is None
    assert meh_parse("boolq", " Yes") == 0 and meh_parse("boolq", " no") == 1
    assert meh_parse("boolq", " yes.") is None and meh_parse("boolq", "no") is None  # MEH requires the exact token
    with pytest.raises(ProbeError):
        meh_parse("nq", " yes")


def test_majority_rate():
    assert majority_rate([0, 1, 1, 1]) == 0.75
    assert majority_rate([0, 1]) == 0.5
    assert majority_rate(["a"] * 3 + ["b"] * 2 + ["c"] * 5) == 0.5
    assert majority_rate([]) == 0.0


def test_metric_names_and_task_choice():
    assert set(Downstream.metrics) == {
        "sst2", "rte", "boolq", "nq", "gsm8k_extract", "gsm8k_meh", "sst2_chance", "rte_chance", "boolq_chance",
        *(f"{t}_meh_{m}" for t in ("sst2", "rte", "boolq") for m in ("answered", "acc_answered", "acc_all"))}
    assert len(set(Downstream.metrics)) == len(Downstream.metrics)
    p = Downstream(tasks=("gsm8k", "sst2"))
    assert p.tasks == ("sst2", "gsm8k") and p.files == (ds.FILES["sst2"], ds.FILES["gsm8k"])
    assert p.task_metrics == ("sst2", "sst2_chance", "sst2_meh_answered", "sst2_meh_acc_answered", "sst2_meh_acc_all",
                              "gsm8k_extract", "gsm8k_meh")
    with pytest.raises(ProbeError, match="'mmlu'"):
        Downstream(tasks=("sst2", "mmlu"))
    with pytest.raises(ProbeError, match="no task"):
        Downstream(tasks=())
    with pytest.raises(ProbeError, match="budget"):
        Downstream(budget="huge")


# ----------------------------------------------------------------------------- reading the real files


@pytest.mark.parametrize("budget", ["quick", "full"])
def test_reads_the_first_rows_of_each_real_file(data_root: Path, budget: str):
    p = Downstream(budget, data_root=data_root)
    data = p.read()
    assert {t: len(d.prompts) for t, d in data.items()} == ds.SIZES[budget]
    assert all(len(d.golds) == len(d.prompts) for d in data.values())
    assert ds.SIZES["quick"] == {"sst2": 64, "rte": 64, "boolq": 32, "nq": 32, "gsm8k": 32}
    assert set(ds.SIZES["full"].values()) == {300}
    # first rows, prompts verbatim (spec table 2.5)
    assert data["sst2"].prompts[0] == (
        "For each snippet of text,label the sentiment of the text as positive or negative.The answer should be exact "
        "'positive' or 'negative'. text: it 's a charming and often affecting journey .  answer:")
    assert data["sst2"].golds[:2] == [0, 1]  # 1 (positive) -> option 0, 0 -> option 1
    assert data["rte"].prompts[0] == ("No Weapons of Mass Destruction Found in Iraq Yet. entails the Weapons of Mass "
                                      "Destruction Found in Iraq.. True or False? answer:")
    assert data["rte"].golds[:2] == [1, 0]
    assert data["boolq"].golds[0] == 1  # answer false -> " no"
    assert data["nq"].prompts[0].startswith("Refer to the passage below and answer the following question. Passage: \n\n")
    assert data["nq"].prompts[0].endswith(" Question: who got the first nobel prize in physics?")
    assert data["nq"].golds[0] == ["Wilhelm Conrad Röntgen"]
    g = data["gsm8k"]
    assert g.golds[0] == "18"
    assert g.prompts[0].startswith("Q: Janet’s ducks lay 16 eggs per day.")
    # the rationale verbatim (calculator notes and its final newline kept), without the '#### N' line
    assert "A:Let's think step by step. Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n" in g.prompts[0]
    assert g.prompts[0].endswith("market.\n Therefore, the answer (arabic numerals) is:") and "####" not in g.prompts[0]
    # RTE text keeps its quotation marks (QUOTE_NONE): line 14 of the file is index 12
    assert 'found "extensive" additional damage' in data["rte"].prompts[12]


def _write_tmp_data(root: Path, rows: int = 6) -> Path:
    """Small well-formed copies of the five files (short texts so that a tiny model's 256-token context
    holds every prompt)."""
    d = root / "downstream"
    d.mkdir(parents=True, exist_ok=True)
    sst = ["a fine film .", "dull and slow .", "a joy .", "bad acting .", "great fun .", "a mess ."]
    (d / "test-SentimentAnalysis.tsv").write_text(
        "sentence\tlabel\n" + "".join(f"{s} \t{1 - i % 2}\n" for i, s in enumerate(sst[:rows])))
    (d / "test-NLI.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + "".join(
        f"{i}\tRome is in Italy.\tRome is a city.\t{'entailment' if i % 3 else 'not_entailment'}\n" for i in range(rows)))
    (d / "test-ClosedDomainQA.jsonl").write_text("".join(json.dumps(
        {"question": "is paris in france", "title": "Paris", "answer": i % 2 == 0, "passage": "Paris is in France."}) + "\n"
        for i in range(rows)))
    (d / "test-OpenDomainQA.jsonl").write_text("".join(json.dumps(
        {"question": "what is the capital of japan?", "answer": ["Tokyo"], "output": ["The capital of Japan is Tokyo."]})
        + "\n" for _ in range(rows)))
    (d / "test-reasoning.jsonl").write_text("".join(json.dumps(
        {"question": f"What is 2+{i}?", "answer": f"2+{i}=<<2+{i}={2 + i}>>{2 + i}\n#### {2 + i}"}) + "\n"
        for i in range(rows)))
    return root


@pytest.fixture
def small_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Downstream, "SIZES", {"quick": {t: 6 for t in ds.TASKS}, "full": {t: 6 for t in ds.TASKS}})


def test_broken_files_raise_probe_error_naming_file_line_and_field(tmp_path: Path, small_sizes: None):
    root = _write_tmp_data(tmp_path)
    Downstream(data_root=root).read()  # the well-formed copy reads

    boolq = root / "downstream" / "test-ClosedDomainQA.jsonl"
    lines = boolq.read_text().splitlines()
    rec = json.loads(lines[2])
    del rec["passage"]
    boolq.write_text("\n".join(lines[:2] + [json.dumps(rec)] + lines[3:]) + "\n")
    with pytest.raises(ProbeError, match=r"test-ClosedDomainQA\.jsonl.*line 3.*'passage'"):
        Downstream(data_root=root, tasks=("boolq",)).read()

    sst = root / "downstream" / "test-SentimentAnalysis.tsv"
    sst.write_text("sentence\tlabel\na fine film .\t1\nno label here\n" + "x\t0\n" * 5)
    with pytest.raises(ProbeError, match=r"test-SentimentAnalysis\.tsv.*line 3.*'label'"):
        Downstream(data_root=root, tasks=("sst2",)).read()
    sst.write_text("sentence\tlabel\n" + "a fine film .\tpositive\n" * 6)
    with pytest.raises(ProbeError, match=r"line 2.*'label'"):
        Downstream(data_root=root, tasks=("sst2",)).read()

    rte = root / "downstream" / "test-NLI.tsv"
    rte.write_text("index\tpremise\thypothesis\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(ProbeError, match=r"test-NLI\.tsv.*'sentence1'"):
        Downstream(data_root=root, tasks=("rte",)).read()

    gsm = root / "downstream" / "test-reasoning.jsonl"
    good = gsm.read_text()
    gsm.write_text(json.dumps({"question": "q?", "answer": "no final answer"}) + "\n" + good)
    with pytest.raises(ProbeError, match=r"line 1.*'answer'"):
        Downstream(data_root=root, tasks=("gsm8k",)).read()
    first, rest = good.split("\n", 1)
    gsm.write_text(first + "\n{not json\n" + rest)
    with pytest.raises(ProbeError, match=r"test-reasoning\.jsonl.*line 2.*JSON"):
        Downstream(data_root=root, tasks=("gsm8k",)).read()

    nq = root / "downstream" / "test-OpenDomainQA.jsonl"
    nq.write_text("".join(json.dumps({"question": "q?", "answer": ["a"], "output": ["p"]}) + "\n" for _ in range(3)))
    with pytest.raises(ProbeError, match=r"test-OpenDomainQA\.jsonl.*3 records.*first 6"):
        Downstream(data_root=root, tasks=("nq",)).read()

    (root / "downstream" / "test-OpenDomainQA.jsonl").unlink()
    with pytest.raises(ProbeError, match="test-OpenDomainQA.jsonl"):
        Downstream(data_root=root, tasks=("nq",)).check()
    # only the chosen tasks' files are needed (and read when checked: this sst2 copy is the broken one above)
    with pytest.raises(ProbeError, match=r"test-SentimentAnalysis\.tsv.*'label'"):
        Downstream(data_root=root, tasks=("sst2",)).check()


# ----------------------------------------------------------------------------- end to end on a tiny model


@pytest.fixture(scope="module")
def tiny():
    return load_lm("tiny-trained-llama")


def test_probe_on_tiny_model_scores_options_by_mean_logprob_when_multi_token(tmp_path: Path, small_sizes: None, tiny):
    p = Downstream(data_root=_write_tmp_data(tmp_path))
    p.prepare(tiny)
    # the tiny byte-level tokenizer splits every option into several tokens: mean log-prob through score()
    assert p.info()["option_scoring"] == {t: ["mean_logprob", "mean_logprob"] for t in ("sst2", "rte", "boolq")}
    assert p.info()["sizes"] == {t: 6 for t in ds.TASKS}
    m = p.measure(tiny, tiny)
    assert p.task_metrics == Downstream.metrics
    # every metric in order; MEH's accuracy over parsed answers only where some output parsed
    assert tuple(m) == tuple(k for k in Downstream.metrics if k in m)
    assert all(k.endswith("_meh_acc_answered") and m[k[: -len("acc_answered")] + "answered"] == 0
               for k in Downstream.metrics if k not in m)
    assert all(0.0 <= v <= 1.0 and not math.isnan(v) for v in m.values())
    assert m["sst2_chance"] == 0.5 and m["rte_chance"] == 4 / 6 and m["boolq_chance"] == 0.5
    for task in ("sst2", "rte", "boolq"):
        d = p.data[task]
        pos, neg = ([-s.mean_nll for s in tiny.score(d.prompts, [opt] * len(d.prompts))] for opt in ds.OPTIONS[task])
        want = sum((0 if a > b else 1) == gold for a, b, gold in zip(pos, neg, d.golds)) / len(d.golds)
        assert m[task] == pytest.approx(want), task
    # the generation tasks agree with a direct greedy generation scored by the rules
    gens = tiny.generate(p.data["gsm8k"].prompts, max_new_tokens=5)
    assert m["gsm8k_extract"] == pytest.approx(
        sum(gsm8k_extract_correct(g, n) for g, n in zip(gens, p.data["gsm8k"].golds)) / 6)
    gens = tiny.generate(p.data["nq"].prompts, max_new_tokens=20)
    assert m["nq"] == pytest.approx(sum(span_match(g, ["Tokyo"]) for g in gens) / 6)


def test_single_token_options_are_read_off_next_token_logprobs(tmp_path: Path, small_sizes: None, tiny,
                                                              monkeypatch: pytest.MonkeyPatch):
    # two options that are single tokens for the tiny tokenizer stand in for " positive" / " negative"
    options = (" Rome", " Japan")
    ids = [tiny.encode_pair("answer:", o)[1] for o in options]
    assert all(len(i) == 1 for i in ids)
    monkeypatch.setitem(ds.OPTIONS, "sst2", options)
    p = Downstream(data_root=_write_tmp_data(tmp_path), tasks=("sst2",))
    p.prepare(tiny)
    assert p.option_ids["sst2"] == (ids[0][0], ids[1][0])
    assert p.info()["option_scoring"] == {"sst2": ["next_token", "next_token"]}
    calls = []
    real = tiny.next_token_logprobs
    monkeypatch.setattr(tiny, "next_token_logprobs", lambda prompts: calls.append(len(prompts)) or real(prompts))
    m = p.measure(tiny, tiny)
    assert calls == [6]  # one batched call for the task
    lp = real(p.data["sst2"].prompts)
    a, b = lp[:, ids[0][0]], lp[:, ids[1][0]]
    pred = torch.where(a > b, 0, 1).tolist()
    assert m["sst2"] == pytest.approx(sum(x == g for x, g in zip(pred, p.data["sst2"].golds)) / 6)


def test_meh_accuracy_over_no_parsed_answer_is_left_out_not_zero(tmp_path: Path, small_sizes: None, tiny,
                                                                 monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(ds, "meh_parse", lambda task, out: None)
    p = Downstream(data_root=_write_tmp_data(tmp_path), tasks=("sst2",))
    p.prepare(tiny)
    m = p.measure(tiny, tiny)
    assert m["sst2_meh_answered"] == 0.0 and m["sst2_meh_acc_all"] == 0.0
    assert "sst2_meh_acc_answered" not in m


def test_meh_variant_equals_a_parse_of_greedy_one_token_generation(tmp_path: Path, small_sizes: None, tiny,
                                                                    monkeypatch: pytest.MonkeyPatch):
    # The tiny model never says " positive"; a parse that accepts any output by its first letter makes the
    # comparison with generate() informative (the probe reads the greedy token off next_token_logprobs).
    def parse(task: str, out: str) -> int | None:
        s = out.strip()
        return None if not s else 0 if s[0].lower() < "m" else 1

    monkeypatch.setattr(ds, "meh_parse", parse)
    p = Downstream(data_root=_write_tmp_data(tmp_path), tasks=("sst2", "rte", "boolq"))
    p.prepare(tiny)
    m = p.measure(tiny, tiny)
    for task in p.tasks:
        d = p.data[task]
        parsed = [parse(task, g) for g in tiny.generate(d.prompts, max_new_tokens=1)]
        answered = [(x, g) for x, g in zip(parsed, d.golds) if x is not None]
        right = sum(x == g for x, g in answered)
        assert answered, task
        assert m[f"{task}_meh_answered"] == pytest.approx(len(answered) / 6)
        assert m[f"{task}_meh_acc_answered"] == pytest.approx(right / len(answered))
        assert m[f"{task}_meh_acc_all"] == pytest.approx(right / 6)


def test_prompt_longer_than_the_context_is_refused_at_prepare(data_root: Path, tiny):
    p = Downstream(data_root=data_root, tasks=("boolq",))
    with pytest.raises(ProbeError, match=r"test-ClosedDomainQA\.jsonl.*line \d+.*context of 256"):
        p.prepare(tiny)
    with pytest.raises(ProbeError, match="before a successful prepare"):
        p.measure(tiny, tiny)


# ----------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_unedited_smollm2_quick_sst2_and_gsm8k(data_root: Path, smollm2):
    p = Downstream("quick", data_root=data_root, tasks=("sst2", "gsm8k"))
    p.prepare(smollm2)
    assert p.info()["option_scoring"] == {"sst2": ["next_token", "next_token"]}  # one SmolLM2 token each
    # spec 2.5 worked example, SST-2 row 1: log p(" positive") -1.788, log p(" negative") -1.255
    lp = smollm2.next_token_logprobs(p.data["sst2"].prompts[:1])[0]
    assert float(lp[p.option_ids["sst2"][0]]) == pytest.approx(-1.788, abs=2e-3)
    assert float(lp[p.option_ids["sst2"][1]]) == pytest.approx(-1.255, abs=2e-3)
    m = p.measure(smollm2, smollm2)
    assert set(m) == set(p.task_metrics)
    # spec 3.3 (first 200 rows): SST-2 0.500, at floor; GSM8K extraction 0.705
    assert 0.45 <= m["sst2"] <= 0.56
    labels = [line.rstrip("\n").split("\t")[-1] for line in (data_root / ds.FILES["sst2"]).open(encoding="utf-8")][1:65]
    assert m["sst2_chance"] == pytest.approx(max(labels.count("0"), labels.count("1")) / 64)
    assert m["gsm8k_extract"] > 0.5
