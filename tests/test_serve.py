"""The playground's JSON API on a tiny model, through FastAPI's test client: apply → probe → undo gives
bit-exact weights; save/load round trips and a save for another model is refused; bad inputs are
answered with 400 and one line while the model and its stack stay as they were; two edits at once end
consistent (one waits its turn or is refused with 409, never a half-edited model)."""

from __future__ import annotations

import socket
import threading

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from editlab.cli import app as cli_app
from editlab.errors import BusyError
from editlab.methods import restore_all
from editlab.methods.catalogue import METHODS
from editlab.models import load_lm
from editlab.serve import Playground, create_app
from editlab.serve.app import STATIC

ROME = dict(METHODS.entry("rome").meta["tiny_hparams"])
FACT = {"method": "rome", "prompt": "The capital of France is", "subject": "France", "target": "Rome",
        "target_true": "Paris", "hparams": ROME,
        "probes": [{"prompt": "The capital city of France is", "kind": "paraphrase"},
                   {"prompt": "The capital of Germany is", "kind": "neighbour"},
                   {"prompt": "Toyota was founded in", "kind": "free"}]}


def same_top(a, b):
    """The same top-k tokens with the same probabilities (prompts batched differently differ in the 6th digit)."""
    return [tok for tok, _ in a] == [tok for tok, _ in b] and [p for _, p in a] == pytest.approx([p for _, p in b], abs=1e-4)


@pytest.fixture(scope="module")
def lm():
    return load_lm("tiny-trained-llama")


@pytest.fixture
def client(lm):
    restore_all(lm)
    with TestClient(create_app(Playground(lm))) as c:
        yield c
    restore_all(lm)


def test_apply_probe_undo_round_trip_is_bit_exact(client, lm):
    info = client.get("/api/info").json()
    assert info["model"] == "tiny-trained-llama" and info["stack"] == []
    assert {m["name"] for m in info["methods"]} >= {"rome", "memit", "ft", "grace", "serac"}
    fingerprint = lm.fingerprint()

    r = client.post("/api/edit", json=FACT)
    assert r.status_code == 200, r.text
    body = r.json()
    before, after = body["before"], body["after"]
    assert [row["kind"] for row in after] == ["prompt", "paraphrase", "neighbour", "free"]
    assert after[0]["top"][0][0].strip() == "Rome" != before[0]["top"][0][0].strip()
    assert after[0]["p_new"] > 0.3 > before[0]["p_new"] and after[0]["p_true"] < before[0]["p_true"]
    assert after[0]["moved"] and after[0]["tv"] > 0.1
    assert len(after[0]["top"]) == 5 and "continuation" in after[0] and "continuation" in before[0]
    assert [e["method"] for e in body["stack"]] == ["rome"]

    # a later probe compares against the model before the newest edit, which it leaves applied
    r = client.post("/api/probe", json={"probes": [{"prompt": "France's capital city is", "kind": "paraphrase"}]})
    assert r.status_code == 200, r.text
    again = r.json()
    assert same_top(again["after"][0]["top"], after[0]["top"]) and same_top(again["before"][0]["top"], before[0]["top"])
    assert len(lm.active_edits) == 1

    r = client.post("/api/undo")
    assert r.status_code == 200 and r.json()["bit_exact"] is True and r.json()["stack"] == []
    assert lm.fingerprint() == fingerprint and not lm.active_edits
    r = client.post("/api/probe", json={"prompt": FACT["prompt"]})  # nothing applied: the model as it is
    assert r.json()["before"] is None and same_top(r.json()["after"][0]["top"], before[0]["top"])


def test_check_reports_before_and_after(client):
    assert client.post("/api/edit", json=FACT).status_code == 200
    r = client.post("/api/check", json={"paraphrases": ["The capital city of France is"],
                                        "neighbours": ["The capital of Germany is"],
                                        "portability": [{"question": "The capital of France is", "answer": "Rome"}]})
    assert r.status_code == 200, r.text
    rows = {row["metric"]: row for row in r.json()["rows"]}
    eff = rows["efficacy (new > old)"]
    assert eff["before"] == 0.0 and eff["after"] == 1.0 and eff["n"] == 1
    assert rows["portability (answer first)"]["after"] == 1.0


def test_save_and_load_round_trip_and_another_model_is_refused(client, lm, tmp_path):
    first = client.post("/api/edit", json=FACT).json()
    assert client.post("/api/save", json={"folder": str(tmp_path / "edit")}).status_code == 200
    client.post("/api/undo")
    r = client.post("/api/load", json={"folder": str(tmp_path / "edit")})
    assert r.status_code == 200, r.text
    assert [e["method"] for e in r.json()["stack"]] == ["rome"]
    probe = client.post("/api/probe", json={"probes": []}).json()
    assert same_top(probe["after"][0]["top"], first["after"][0]["top"])
    assert client.post("/api/undo").json()["bit_exact"] is True

    other = load_lm("tiny-llama")
    with TestClient(create_app(Playground(other))) as c:
        fp = other.fingerprint()
        r = c.post("/api/load", json={"folder": str(tmp_path / "edit")})
        assert r.status_code == 400 and "error" in r.json() and "\n" not in r.json()["error"]
        assert other.fingerprint() == fp and not other.active_edits


@pytest.mark.parametrize("change, needle", [
    ({"subject": "Germany"}, "does not occur in prompt"),
    ({"target": "  "}, "target"),
    ({"method": "nope"}, "unknown method"),
    ({"hparams": {**ROME, "layer": 99}}, "out of range"),
    ({"hparams": {"nope": 1}}, "unknown hyper-parameter"),
    ({"probes": [{"prompt": " ", "kind": "free"}]}, "empty prompt"),
    ({"probes": [{"prompt": "x", "kind": "sideways"}]}, "kind must be one of"),
    ({"prompt": "The capital of France is " + "very " * 600}, "context"),
])
def test_bad_edits_are_refused_and_change_nothing(client, lm, change, needle):
    fp = lm.fingerprint()
    r = client.post("/api/edit", json={**FACT, **change})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"] and "\n" not in r.json()["error"]
    assert lm.fingerprint() == fp and not lm.active_edits


def test_operations_on_an_empty_stack_and_malformed_bodies(client, tmp_path):
    for path, body in (("undo", None), ("save", {"folder": str(tmp_path / "x")}), ("check", {})):
        r = client.post(f"/api/{path}", json=body)
        assert r.status_code == 400 and "no edit" in r.json()["error"], (path, r.text)
    assert client.post("/api/probe", json={}).status_code == 400  # nothing applied and no prompt
    assert client.post("/api/edit", json={"prompt": "x"}).status_code == 422  # fields missing: FastAPI's own answer
    assert client.post("/api/load", json={"folder": str(tmp_path / "missing")}).status_code == 400
    assert client.get("/api/methods/nope/hparams").status_code == 400
    hp = client.get("/api/methods/rome/hparams").json()
    assert hp["hparams"]["layer"] >= 0 and hp["types"]["layer"] == "int"


def test_two_edits_at_once_end_consistent(client, lm):
    fp = lm.fingerprint()
    start = threading.Barrier(2)
    codes: list[int] = []

    def post(target: str) -> None:
        start.wait()
        codes.append(client.post("/api/edit", json={**FACT, "target": target, "probes": []}).status_code)

    threads = [threading.Thread(target=post, args=(t,)) for t in ("Rome", "Berlin")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) in ([200, 200], [200, 409])
    assert len(lm.active_edits) == codes.count(200) == len(client.get("/api/stack").json())
    while lm.active_edits:
        assert client.post("/api/undo").status_code == 200
    assert lm.fingerprint() == fp
    assert client.get("/api/status").json() == {"busy": False, "activity": None, "seconds": None, "edits": 0, "progress": None}


def test_the_page_is_served_and_light(client):
    r = client.get("/")
    assert r.status_code == 200 and "editlab playground" in r.text
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text
    # nothing the API page needs comes from another machine (it must work offline)
    import re
    assert not [u for u in re.findall(r'(?:src|href|url)\s*[:=]\s*["\']([^"\']+)', docs.text) if "//" in u]
    for name in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert client.get(f"/docs-assets/{name}").status_code == 200
    assert client.get("/openapi.json").json()["paths"]["/api/edit"]
    weight = sum(p.stat().st_size for p in STATIC.iterdir())
    assert weight < 300_000


def test_cli_refuses_a_remote_host_or_a_busy_port_before_loading():
    runner = CliRunner()
    r = runner.invoke(cli_app, ["serve", "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "--allow-remote" in r.stderr
    r = runner.invoke(cli_app, ["serve", "--port", "70000"])
    assert r.exit_code == 2 and "1..65535" in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = runner.invoke(cli_app, ["serve", "--port", str(s.getsockname()[1])])
    assert r.exit_code == 2 and "choose another --port" in r.stderr


def test_measurements_follow_the_stack_not_the_cache(client, lm):
    """Probes are cached per stack state; undoing an edit and applying another must never serve the
    first edit's numbers, and the cached before-values equal freshly measured ones."""
    first = client.post("/api/edit", json={**FACT, "probes": FACT["probes"][:1]}).json()
    assert first["after"][0]["top"][0][0].strip() == "Rome"
    client.post("/api/undo")
    second = client.post("/api/edit", json={**FACT, "target": "Berlin", "probes": FACT["probes"][:1]}).json()
    assert second["after"][0]["top"][0][0].strip() != "Rome"
    assert second["after"][0]["p_new"] != first["after"][0]["p_new"]  # p(Berlin), not p(Rome)
    assert same_top(second["before"][0]["top"], first["before"][0]["top"])  # the same unedited model
    again = client.post("/api/probe", json={"probes": FACT["probes"][:1]}).json()
    assert again["after"][0] == second["after"][0] and again["before"][0] == second["before"][0]


def test_review_regressions_answer_400_not_500(client, lm, monkeypatch):
    """Found in review: a full cache evicting this call's own entries, an unknown ~user folder, a
    string hyper-parameter given a number, and an over-long check prompt each gave a 500."""
    import editlab.serve.playground as pg

    monkeypatch.setattr(pg, "CACHE_ENTRIES", 4)
    assert client.post("/api/probe", json={"prompt": "alpha one"}).status_code == 200
    r = client.post("/api/probe", json={"prompt": "alpha one", "probes": [{"prompt": p} for p in ("gamma", "delta", "epsilon")]})
    assert r.status_code == 200, r.text
    r = client.post("/api/load", json={"folder": "~nosuchuser123456/edit"})
    assert r.status_code == 400 and "nosuchuser" in r.json()["error"]
    r = client.post("/api/edit", json={**FACT, "hparams": {**ROME, "corpus": 5}})
    assert r.status_code == 400 and "corpus" in r.json()["error"]
    assert client.post("/api/edit", json={**FACT, "probes": []}).status_code == 200
    r = client.post("/api/check", json={"paraphrases": ["The capital of France is " + "very " * 600]})
    assert r.status_code == 400 and "context" in r.json()["error"]
    assert [e["method"] for e in client.get("/api/stack").json()] == ["rome"]


def test_closed_playground_refuses_model_work_and_leaves_the_model_alone(lm):
    from editlab.errors import BusyError

    restore_all(lm)
    pg = Playground(lm)
    assert pg.probe(prompt=FACT["prompt"])["after"]
    fingerprint = lm.fingerprint()
    pg.close()
    with pytest.raises(BusyError, match="closed"):
        pg.apply("rome", FACT["prompt"], FACT["subject"], FACT["target"])
    assert lm.fingerprint() == fingerprint and not lm.active_edits


def test_before_and_after_from_one_paired_pass_equal_the_separate_passes(client, lm, monkeypatch):
    """A weight-delta edit's before and after are measured in one pass of twice the rows; the page
    shows the same numbers as when they are measured apart (restore, measure, reapply)."""
    import editlab.serve.playground as playground

    calls = []
    real = lm.paired_next_token_and_score
    monkeypatch.setattr(lm, "paired_next_token_and_score", lambda *a: calls.append(a) or real(*a))
    paired = client.post("/api/edit", json=FACT).json()
    assert len(calls) == 1  # both states of every prompt in one call
    assert client.post("/api/undo").json()["bit_exact"] is True
    monkeypatch.setattr(playground, "pairable", lambda _lm: False)
    client.app.state.playground._cache.clear()  # the apart path measures both states itself
    apart = client.post("/api/edit", json=FACT).json()
    assert len(calls) == 1
    for side in ("before", "after"):
        for a, b in zip(paired[side], apart[side]):
            assert same_top(a["top"], b["top"]) and a.get("continuation") == b.get("continuation")
            assert a["p_new"] == pytest.approx(b["p_new"], abs=1e-4) and a["p_true"] == pytest.approx(b["p_true"], abs=1e-4)
    assert [r["moved"] for r in paired["after"]] == [r["moved"] for r in apart["after"]]


def test_prepare_does_the_first_edits_once_only_work_ahead(lm):
    """`editlab serve` prepares the page's default method before it listens: ROME's context templates are
    sampled then, and the first edit reuses them (the same object), weights untouched."""
    restore_all(lm)
    lm.cache.clear()
    fingerprint = lm.fingerprint()
    playground = Playground(lm)
    try:
        playground.prepare("rome")
        kept = {k: v for k, v in lm.cache.items() if isinstance(k, tuple) and k[0] == "context_templates"}
        assert len(kept) == 1 and lm.fingerprint() == fingerprint and lm.active_edits == []
        playground.apply(**{**FACT, "hparams": {k: v for k, v in ROME.items() if k != "context_templates"}})
        assert all(lm.cache[k] is v for k, v in kept.items())
    finally:
        playground.close()
        restore_all(lm)


def test_a_pair_too_long_for_one_batch_is_measured_apart(client, lm, monkeypatch):
    """Prompt and continuation twice over the token budget: the playground measures before and after
    apart (restore, reapply) instead of failing after the edit is in."""
    n = len(lm.encode_prompt(FACT["prompt"])) + client.app.state.playground.continuation_tokens
    monkeypatch.setattr(lm, "max_batch_tokens", 2 * n - 1)
    r = client.post("/api/edit", json=FACT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["after"][0]["top"][0][0].strip() == "Rome" != body["before"][0]["top"][0][0].strip()
    assert len(body["stack"]) == 1 and client.post("/api/probe", json={"probes": [{"prompt": "Rome is", "kind": "free"}]}).status_code == 200


GRACE = dict(METHODS.entry("grace").meta["tiny_hparams"])


def test_a_second_edit_of_the_same_method_extends_it_or_stacks_a_new_one(client, lm):
    fp = lm.fingerprint()
    fact = {**FACT, "method": "grace", "hparams": GRACE, "probes": []}
    first = client.post("/api/edit", json=fact)
    assert first.status_code == 200 and first.json()["extended"] is False and "not_extended" not in first.json()
    # the same layer: the codebook grows
    second = client.post("/api/edit", json={**fact, "prompt": "The capital of Spain is", "subject": "Spain"})
    assert second.status_code == 200 and second.json()["extended"] is True
    # another layer cannot extend the codebook at layer 2: a new GRACE edit goes on top, and the page is told why
    other = {**fact, "prompt": "The capital of Italy is", "subject": "Italy", "hparams": {**GRACE, "layer": 1}}
    refused = client.post("/api/edit", json={**other, "extend": True})
    assert refused.status_code == 400 and "codebook" in refused.json()["error"]
    assert len(client.get("/api/stack").json()) == 2
    third = client.post("/api/edit", json=other)
    assert third.status_code == 200, third.text
    body = third.json()
    assert body["extended"] is False and "codebook" in body["not_extended"] and len(body["stack"]) == 3
    assert body["after"][0]["top"][0][0].strip() == "Rome"
    # false stacks a new edit even where extending would work
    fourth = client.post("/api/edit", json={**other, "target": "Berlin", "extend": False})
    assert fourth.status_code == 200 and fourth.json()["extended"] is False and "not_extended" not in fourth.json()
    # a method that cannot extend refuses true before touching the model
    assert client.post("/api/edit", json={**FACT, "extend": True}).status_code == 400
    assert len(lm.active_edits) == 4
    while lm.active_edits:
        assert client.post("/api/undo").json()["bit_exact"] is True
    assert lm.fingerprint() == fp


def test_an_edit_waits_for_a_running_probe_and_a_second_change_is_refused(lm, monkeypatch):
    restore_all(lm)
    pg = Playground(lm)
    probing, go = threading.Event(), threading.Event()
    report = pg._report

    def slow_first_report(*args, **kwargs):
        if not probing.is_set():
            probing.set()
            assert go.wait(30)
        return report(*args, **kwargs)

    monkeypatch.setattr(pg, "_report", slow_first_report)
    results: dict[str, object] = {}
    probe = threading.Thread(target=lambda: results.setdefault("probe", pg.probe(prompt="The capital of France is")))
    probe.start()
    assert probing.wait(30)
    fact = {k: FACT[k] for k in ("prompt", "subject", "target", "target_true")}
    edit = threading.Thread(target=lambda: results.setdefault("edit", pg.apply("rome", hparams=ROME, **fact)))
    edit.start()
    for _ in range(3000):  # the edit has passed the write gate and waits for the probe to finish
        if pg._write is not None:
            break
        threading.Event().wait(0.01)
    assert pg._write == "applying rome"
    with pytest.raises(BusyError, match="applying rome"):
        pg.undo()
    go.set()
    probe.join(60)
    edit.join(120)
    # the probe saw the model before the edit, whole
    assert same_top(results["probe"]["after"][0]["top"], results["edit"]["before"][0]["top"])
    assert results["edit"]["after"][0]["top"][0][0].strip() == "Rome" and len(lm.active_edits) == 1
    assert pg.status()["busy"] is False and pg._write is None
    pg.undo()
    pg.close()
    assert not lm.active_edits


def test_only_a_refusal_to_extend_is_retried_as_a_new_edit(lm, monkeypatch):
    """Another error of an extending edit (here a hyper-parameter the method refuses late) is answered as
    it is, after one attempt: the fallback is for `CannotExtendError` only."""
    from editlab.errors import CannotExtendError, HparamsError
    from editlab.serve import playground as module

    restore_all(lm)
    pg = Playground(lm)
    first = pg.apply("grace", "The capital of France is", "France", "Rome", "Paris", hparams=GRACE)
    assert first["extended"] is False
    real, calls = module.get_editor, []

    class Refusing:
        def __init__(self, editor, error):
            self._e, self._error = editor, error

        def __getattr__(self, name):
            return getattr(self._e, name)

        def apply(self, lm_, req, hp, on=None):
            calls.append(on)
            if on is not None:
                raise self._error
            return self._e.apply(lm_, req, hp)

    fact = ("The capital of Spain is", "Spain", "Oslo", "Madrid")
    monkeypatch.setattr(module, "get_editor", lambda name: Refusing(real(name), HparamsError("late refusal")))
    with pytest.raises(HparamsError, match="late refusal"):
        pg.apply("grace", *fact, hparams=GRACE)
    assert len(calls) == 1 and len(lm.active_edits) == 1
    monkeypatch.setattr(module, "get_editor", lambda name: Refusing(real(name), CannotExtendError("other layer")))
    out = pg.apply("grace", *fact, hparams=GRACE)
    assert out["extended"] is False and out["not_extended"] == "other layer" and len(lm.active_edits) == 2
    restore_all(lm)
    pg.close()
