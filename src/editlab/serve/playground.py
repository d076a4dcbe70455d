"""The playground's model session: one model in memory, its edit stack, and what the web page asks of
it (apply, probe, undo, save, load, a short pitfall check), as plain Python so the API and its tests
share one implementation.

Concurrency: probes, checks and edits that compare against the state before the newest edit take that
edit off and put it back (`Edit.restore` + `Edit.reapply`, bit-exact) — or, for an edit made of weight
deltas, run both states in one pass of twice the rows (`methods.paired`, about a pass's fixed cost
less) — so every operation that touches the model holds one lock. Reads (probes, checks) queue for it.
Writes (edit, undo, save, load) go through a gate first: a write that arrives while another write is
running or waiting is refused at once with `BusyError` (the page shows "busy"); one that arrives while
reads run waits for them (they take a fraction of a second), and reads that arrive after it wait behind
it, so a stream of probes cannot starve an edit. Nothing is ever observed half-edited. The work itself runs on one dedicated model thread, whichever request thread asked for
it: torch's OpenMP pool is per calling thread, and on a small CPU the pool of the thread that ran the
previous request keeps spinning for a while and takes cores from the next (a ROME edit measured 40 %
slower on a fresh request thread than on the thread that ran the last one).

Comparisons are against the model before the newest edit ("before") and with it ("after"). A probe
"moved" when its top-1 next token changed or the total variation distance between its before/after
next-token distributions is at least `MOVED_TV` (0.1); a moved neighbour or free prompt is what the
page highlights.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import torch

from ..errors import (BusyError, CannotExtendError, EditRequestError, EditStackError, HparamsError, OutputPathError,
                      PromptTooLongError)
from ..methods import get_editor
from ..methods.catalogue import METHODS
from ..methods.edit import Edit
from ..methods.edit_folder import check_save_target
from ..methods.paired import pairable, without_and_with_top
from ..models.lm import LM
from ..progress import watching
from ..requests import EditRequest, _context_limit, check_fits

PROBE_KINDS = ("paraphrase", "neighbour", "free")
MOVED_TV = 0.1
MAX_PROBES = 50
MAX_TOP_K = 20
MAX_CONTINUATION = 64
CACHE_ENTRIES = 512  # measured prompts kept (each holds a next-token distribution: 4 bytes x vocabulary)
T = TypeVar("T")


@dataclass(frozen=True)
class Probe:
    prompt: str
    kind: str = "free"

    @classmethod
    def parse(cls, items: Sequence[Mapping[str, Any] | str] | None) -> list["Probe"]:
        out = []
        for i, item in enumerate(items or []):
            prompt, kind = (item, "free") if isinstance(item, str) else (item.get("prompt"), item.get("kind", "free"))
            if not isinstance(prompt, str) or not prompt.strip():
                raise EditRequestError(f"probe {i + 1} has an empty prompt")
            if kind not in PROBE_KINDS:
                raise EditRequestError(f"probe {i + 1}: kind must be one of {', '.join(PROBE_KINDS)}, got {kind!r}")
            out.append(cls(prompt, kind))
        if len(out) > MAX_PROBES:
            raise EditRequestError(f"at most {MAX_PROBES} probes at a time, got {len(out)}")
        return out


def _check_int(name: str, value: Any, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise EditRequestError(f"{name} must be an integer in 1..{high}, got {value!r}")
    return value


class Playground:
    """One model and its edit stack, driven by the web page (or any script through the API)."""

    def __init__(self, lm: Any, *, top_k: int = 5, continuation_tokens: int = 8) -> None:
        self.lm = lm
        self.top_k = _check_int("top_k", top_k, MAX_TOP_K)
        self.continuation_tokens = _check_int("continuation_tokens", continuation_tokens, MAX_CONTINUATION)
        self._lock = threading.Lock()  # the model: held by whatever operation is using it
        self._gate = threading.Condition()  # guards `_write`; reads wait on it while a write is pending
        self._write: str | None = None  # the one write (edit, undo, save, load) running or waiting for the model
        self._fingerprints: dict[str, str] = {}  # edit id -> weights fingerprint before it (undo check)
        self._activity: tuple[str, float] | None = None  # what holds the lock, since when
        self._progress: tuple[str, int, int] | None = None  # a long computation inside it: task, done, total
        self._stack: list[dict[str, Any]] = [_describe(e) for e in lm.active_edits]  # between operations; read without the lock
        self._cache: OrderedDict[tuple[Any, ...], tuple[dict[str, Any], torch.Tensor]] = OrderedDict()
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="editlab-model")

    def prepare(self, method: str = "rome") -> None:
        """Do ahead, on the model thread, what `method`'s first edit would compute once (its context
        templates, about a second on SmolLM2 on CPU): the page's default method's first edit is then no
        slower than the next. The server calls it before it listens; statistics are not computed here."""
        editor = get_editor(METHODS.resolve(method))
        hp = editor.hparams(self.lm)
        with self._exclusive(wait=True, activity=f"preparing {editor.name}"):
            self._on_model_thread(lambda: editor.prepare(self.lm, hp))

    def close(self) -> None:
        """Stop the model thread once the work already handed to it has finished (the server has stopped).
        Later model operations raise `BusyError`."""
        self._model_thread.shutdown(wait=True)

    def status(self) -> dict[str, Any]:
        """What the playground is doing now (the page polls this while an edit runs)."""
        act, prog = self._activity, self._progress
        return {"busy": act is not None, "activity": act[0] if act else None,
                "seconds": round(time.perf_counter() - act[1], 1) if act else None, "edits": len(self._stack),
                "progress": None if prog is None else {"task": prog[0], "done": prog[1], "total": prog[2]}}

    def _watch(self, task: str, done: int, total: int) -> None:
        self._progress = (task, done, total) if done < total else None  # finished: the edit goes on without it

    # ---------------------------------------------------------------- locking
    @contextmanager
    def _exclusive(self, wait: bool, activity: str) -> Iterator[None]:
        """Hold the model for one operation. `wait=True` (a read, or preparing): queue behind any write
        running or waiting, then for the model. `wait=False` (a write): refused with `BusyError` while
        another write runs or waits; otherwise wait for the reads in progress."""
        if wait:
            with self._gate:  # a pending write goes first
                self._gate.wait_for(lambda: self._write is None)
            self._lock.acquire()
        else:
            with self._gate:
                if self._write is not None:
                    raise BusyError(f"busy: {self._write} is running; try again when it has finished")
                self._write = activity
            try:
                self._lock.acquire()
            except BaseException:
                self._end_write()
                raise
        self._activity = (activity, time.perf_counter())
        try:
            yield
        finally:
            self._activity = self._progress = None
            self._lock.release()
            if not wait:
                self._end_write()

    def _end_write(self) -> None:
        with self._gate:
            self._write = None
            self._gate.notify_all()

    def _on_model_thread(self, fn: Callable[[], T]) -> T:
        """Run `fn` (model work; the caller holds the lock) on the model thread and return its result."""
        try:
            future = self._model_thread.submit(fn)
        except RuntimeError:  # shut down by close()
            raise BusyError("the playground has been closed; start it again to edit") from None
        try:
            return future.result()
        except BaseException:
            if not future.done():  # interrupted while waiting: keep the lock until the work has finished
                wait([future])
            raise

    @contextmanager
    def _without_top(self) -> Iterator[None]:
        """The model as it was before its newest edit, for the duration of the block (lock held)."""
        top = self.lm.active_edits[-1] if self.lm.active_edits else None
        if top is None:
            yield
            return
        top.restore()
        try:
            yield
        finally:
            top.reapply()

    # ---------------------------------------------------------------- read-only views
    def info(self) -> dict[str, Any]:
        methods = [{"name": e.name, "family": e.meta.get("family", ""), "description": e.description,
                    "batch": bool(e.meta.get("batch"))} for e in METHODS.entries()]
        return {"model": self.lm.name, "fingerprint": self.lm.base_fingerprint, "layers": self.lm.n_layers,
                "methods": methods, "stack": self.stack(), "top_k": self.top_k,
                "continuation_tokens": self.continuation_tokens, "moved_tv": MOVED_TV}

    def stack(self) -> list[dict[str, Any]]:
        """The applied edits, oldest first, as of the last finished operation (while a probe takes the
        newest edit off to measure "before", this still lists it)."""
        return list(self._stack)

    def _snapshot(self) -> list[dict[str, Any]]:
        self._stack = [_describe(e) for e in self.lm.active_edits]
        return self.stack()

    def method_hparams(self, method: str) -> dict[str, Any]:
        """The hyper-parameters `method` uses on this model (defaults, preset), with each value's type."""
        name = METHODS.resolve(method)
        hp = get_editor(name).hparams(self.lm).to_dict()
        return {"method": name, "hparams": hp, "types": {k: type(v).__name__ for k, v in hp.items()}}

    # ---------------------------------------------------------------- measuring
    def _keys(self, main: tuple[str, str | None, str | None], probes: Sequence[Probe],
              state: tuple[str, ...]) -> list[tuple[Any, ...]]:
        prompt, new, true = main
        return [(state, prompt, new, true, True)] + [(state, p.prompt, new, true, False) for p in probes]

    def _measure(self, main: tuple[str, str | None, str | None], probes: Sequence[Probe],
                 state: tuple[str, ...] | None = None) -> list[tuple[dict[str, Any], torch.Tensor]]:
        """Per prompt (the main one first, with its greedy continuation; then the probes): its row and
        next-token probabilities [vocab], for the model in `state` (the ids of the applied edits; default:
        as it is now). Results are cached by state, prompt and targets: the same weights give the same
        numbers (reapply is bit-exact), so re-probing costs only the prompts not seen in this state."""
        current = tuple(e.id for e in self.lm.active_edits)
        state = current if state is None else state
        prompt, new, true = main
        items = [prompt] + [p.prompt for p in probes]
        keys = self._keys(main, probes, state)
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        if missing:
            if state != current:
                raise RuntimeError("uncached measurements of another state")  # callers suspend the top edit first
            system = self.lm.edited
            prompts = list(dict.fromkeys(items[i] for i in missing))
            measured = self._rows(prompts, *_next_and_scores(system, prompts, [x for x in (new, true) if x]), new, true)
            if 0 in missing:  # the main prompt's row also holds its greedy continuation
                row, dist = measured[prompt]
                main_row = ({**row, "continuation": system.generate([prompt], self.continuation_tokens)[0]}, dist)
            for i in missing:
                self._cache[keys[i]] = main_row if i == 0 else measured[items[i]]
        out = []
        for key, kind in zip(keys, ["prompt"] + [p.kind for p in probes]):
            self._cache.move_to_end(key)
            row, dist = self._cache[key]
            out.append(({**row, "kind": kind}, dist))
        while len(self._cache) > CACHE_ENTRIES:  # after reading this call's entries, which are now the newest
            self._cache.popitem(last=False)
        return out

    def _rows(self, prompts: Sequence[str], logprobs: torch.Tensor, scores: list[list[Any]], new: str | None,
              true: str | None) -> dict[str, tuple[dict[str, Any], torch.Tensor]]:
        """Per prompt: its row (top-k next tokens, p_new, p_true) and its next-token probabilities."""
        probs = logprobs.float().exp()
        tok = self.lm.tokenizer
        measured = {}
        for j, p in enumerate(prompts):
            values, ids = probs[j].topk(self.top_k)
            row: dict[str, Any] = {"prompt": p, "top": [[tok.decode([int(x)]), round(float(v), 6)] for v, x in zip(values, ids)]}
            for n, (name, x) in enumerate((k, x) for k, x in (("p_new", new), ("p_true", true)) if x):
                row[name] = round(math.exp(float(scores[n][j].logprobs.sum())), 6)
            measured[p] = (row, probs[j].clone())
        return measured

    def _measure_both(self, main: tuple[str, str | None, str | None], probes: Sequence[Probe],
                      below: tuple[str, ...]) -> None:
        """Cache the prompts' measurements before and after the newest edit that either state lacks, both
        from one set of passes of twice the rows (`methods.paired`; the newest edit is weight deltas)."""
        current = tuple(e.id for e in self.lm.active_edits)
        prompt, new, true = main
        items = [prompt] + [p.prompt for p in probes]
        keys_before, keys_after = self._keys(main, probes, below), self._keys(main, probes, current)
        missing = [i for i in range(len(items)) if keys_before[i] not in self._cache or keys_after[i] not in self._cache]
        if not missing:
            return
        if 0 in missing and 2 * (len(self.lm.encode_prompt(prompt)) + self.continuation_tokens) > self.lm.max_batch_tokens:
            return  # the two continuations do not fit one generation batch: measured apart (restore, reapply)
        prompts = list(dict.fromkeys(items[i] for i in missing))
        with without_and_with_top(self.lm):
            halves = self.lm.paired_next_token_and_score(prompts, [x for x in (new, true) if x])
            both = [self._rows(prompts, logprobs, scores, new, true) for logprobs, scores in halves]
            conts = self.lm.generate([prompt, prompt], self.continuation_tokens) if 0 in missing else ["", ""]
        for keys, measured, cont in zip((keys_before, keys_after), both, conts):
            for i in missing:
                if keys[i] in self._cache:  # a value already shown stays as it was
                    continue
                row, dist = measured[items[i]]
                self._cache[keys[i]] = ({**row, "continuation": cont}, dist) if i == 0 else (row, dist)

    def _report(self, main: tuple[str, str | None, str | None], probes: Sequence[Probe], compare: bool) -> dict[str, Any]:
        below = tuple(e.id for e in self.lm.active_edits[:-1])
        if compare and pairable(self.lm):
            self._measure_both(main, probes, below)
        after = self._measure(main, probes)
        if not compare:
            return {"before": None, "after": [row for row, _ in after]}
        if all(key in self._cache for key in self._keys(main, probes, below)):
            before = self._measure(main, probes, below)  # from the cache: the top edit stays where it is
        else:
            with self._without_top():
                before = self._measure(main, probes)
        for (b, pb), (a, pa) in zip(before, after):
            tv = 0.5 * float((pb - pa).abs().sum())
            a["tv"] = round(tv, 6)
            a["moved"] = b["top"][0][0] != a["top"][0][0] or tv >= MOVED_TV
        return {"before": [row for row, _ in before], "after": [row for row, _ in after]}

    def _check_lengths(self, prompts: Sequence[str]) -> None:
        limit = _context_limit(self.lm)
        for p in prompts:
            n = len(self.lm.encode_prompt(p)) + self.continuation_tokens
            if limit is not None and n > limit:
                raise PromptTooLongError(f"probe {p[:60]!r} with {self.continuation_tokens} more tokens is {n} tokens, "
                                         f"over the model's context of {limit}")

    # ---------------------------------------------------------------- operations
    def apply(self, method: str, prompt: str, subject: str, target: str, target_true: str | None = None,
              hparams: Mapping[str, Any] | None = None, probes: Sequence[Mapping[str, Any] | str] | None = None,
              extend: bool | None = None) -> dict[str, Any]:
        """Validate everything, apply the edit on top of the stack, and report before/after.

        `extend`: whether the edit extends the newest one (`apply(..., on=newest)`: one codebook, memory
        or sequence grows) or is a new edit stacked on top of it. None (the default) extends when the
        newest edit is of the same method and can be extended with these hyper-parameters (another
        layer or module, another adapter shape, a prompt the sequence already holds, ...), and otherwise
        stacks a new edit, saying why in `not_extended`. True insists (an edit that cannot be extended is
        refused with the method's reason); False always stacks a new edit."""
        req = EditRequest.create(prompt, subject, target, target_true or None)
        name = METHODS.resolve(method)
        parsed = Probe.parse(probes)
        if hparams is not None and not isinstance(hparams, Mapping):
            raise HparamsError(f"hparams must be a mapping of name to value, got {type(hparams).__name__}")
        if extend is not None and not isinstance(extend, bool):
            raise EditRequestError(f"extend must be true, false or null (decide), got {extend!r}")
        editor = get_editor(name)
        if extend and not editor.supports_on:
            raise EditRequestError(f"{name} edits cannot extend an earlier edit; stack a new one (extend false)")
        hp = editor.hparams(self.lm, **dict(hparams or {}))
        check_fits(req, self.lm, reserve=self.continuation_tokens)
        self._check_lengths([p.prompt for p in parsed])

        def work() -> dict[str, Any]:
            top = self.lm.active_edits[-1] if self.lm.active_edits else None
            same = editor.supports_on and top is not None and top.method == name
            if extend and not same:
                raise EditStackError(f"nothing to extend: the newest edit is "
                                     f"{'not there' if top is None else f'a {top.method} edit'}, not a {name} one")
            on = top if same and extend is not False else None
            before_fp = self.lm.current_fingerprint()
            t0 = time.perf_counter()
            not_extended = None
            with watching(self._watch):  # statistics computed the first time: the page shows how far
                try:
                    edit = editor.apply(self.lm, req, hp, on=on)
                except CannotExtendError as e:
                    if on is None or extend:
                        raise
                    # the method refused to extend the newest edit (and changed nothing): stack a new edit instead
                    not_extended = " ".join(str(e).split())
                    on = None
                    edit = editor.apply(self.lm, req, hp)
            self._progress = None
            seconds = time.perf_counter() - t0
            self._fingerprints[edit.id] = before_fp
            report = self._report((req.prompt, req.target_new, req.target_true), parsed, compare=True)
            out = {"edit": _describe(edit), "extended": on is not None, "seconds": round(seconds, 3), **report,
                   "stack": self._snapshot()}
            return {**out, "not_extended": not_extended} if not_extended else out

        with self._exclusive(wait=False, activity=f"applying {name}"):
            return self._on_model_thread(work)

    def probe(self, probes: Sequence[Mapping[str, Any] | str] | None = None, prompt: str | None = None) -> dict[str, Any]:
        """The probes (and the newest edit's prompt, or `prompt`) before and after the newest edit; with
        no edit applied, the model as it is."""
        parsed = Probe.parse(probes)

        def work() -> dict[str, Any]:
            top = self.lm.active_edits[-1] if self.lm.active_edits else None
            if prompt is None and top is None:
                raise EditRequestError("no edit applied and no prompt given: give a prompt to probe")
            if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
                raise EditRequestError("the prompt to probe is empty")
            self._check_lengths([p.prompt for p in parsed] + ([prompt] if prompt else []))
            req = top.requests[0] if top is not None else None
            main = (prompt or req.prompt, req.target_new if req else None, req.target_true if req else None)
            return {**self._report(main, parsed, compare=top is not None), "stack": self.stack()}

        with self._exclusive(wait=True, activity="probing"):
            return self._on_model_thread(work)

    def undo(self) -> dict[str, Any]:
        """Restore the newest edit; reports whether the weights are bit-identical to before it."""

        def work() -> dict[str, Any]:
            if not self.lm.active_edits:
                raise EditStackError("no edit to undo")
            top = self.lm.active_edits[-1]
            top.restore()
            before = self._fingerprints.pop(top.id, None)
            exact = None if before is None else self.lm.fingerprint() == before  # hashed, not assumed
            return {"undone": _describe(top), "bit_exact": exact, "stack": self._snapshot()}

        with self._exclusive(wait=False, activity="undoing"):
            return self._on_model_thread(work)

    def save(self, folder: str) -> dict[str, Any]:
        """Save the newest edit into `folder` (absent, empty, or an earlier edit's folder)."""
        if not isinstance(folder, str) or not folder.strip():
            raise EditRequestError("give a folder to save the edit into")
        path = _folder(folder)
        check_save_target(path)

        def work() -> dict[str, Any]:
            if not self.lm.active_edits:
                raise EditStackError("no edit to save")
            top = self.lm.active_edits[-1]
            return {"saved": _describe(top), "folder": str(top.save(path))}

        with self._exclusive(wait=False, activity="saving"):
            return self._on_model_thread(work)

    def load(self, folder: str) -> dict[str, Any]:
        """Load a saved edit onto the stack (refused, with the reason, if made for another model or damaged)."""
        if not isinstance(folder, str) or not folder.strip():
            raise EditRequestError("give the folder of a saved edit")

        def work() -> dict[str, Any]:
            before_fp = self.lm.current_fingerprint()
            edit = Edit.load(_folder(folder), self.lm)
            self._cache.clear()  # a loaded edit keeps its saved id; never trust measurements keyed by it
            self._fingerprints[edit.id] = before_fp
            return {"loaded": _describe(edit), "stack": self._snapshot()}

        with self._exclusive(wait=False, activity="loading an edit"):
            return self._on_model_thread(work)

    def check(self, paraphrases: Sequence[str] = (), neighbours: Sequence[str] = (),
              portability: Sequence[Mapping[str, str]] = ()) -> dict[str, Any]:
        """A short pitfall check of the newest edit, before and after it, CounterFact-style:
        efficacy and paraphrase success (p(new) > p(true)), neighbourhood success (p(true) > p(new) on
        prompts about other subjects) and portability (the greedy answer to a question starts with the
        expected answer)."""
        qs = [(q.get("question"), q.get("answer")) if isinstance(q, Mapping) else (None, None) for q in portability]
        for i, (q, a) in enumerate(qs):
            if not isinstance(q, str) or not q.strip() or not isinstance(a, str) or not a.strip():
                raise EditRequestError(f"portability item {i + 1} needs a question and an answer")
        for name, items in (("paraphrase", paraphrases), ("neighbour", neighbours)):
            if any(not isinstance(p, str) or not p.strip() for p in items):
                raise EditRequestError(f"a {name} prompt is empty")
        if len(paraphrases) + len(neighbours) + len(qs) > MAX_PROBES:
            raise EditRequestError(f"at most {MAX_PROBES} prompts and questions at a time")
        self._check_lengths(list(paraphrases) + list(neighbours) + [q for q, _ in qs])

        def work() -> tuple[Any, Any, dict[str, Any]]:
            if not self.lm.active_edits:
                raise EditStackError("no edit to check: apply one first")
            req = self.lm.active_edits[-1].requests[0]
            if not req.target_true:
                raise EditRequestError("the check compares the new and the old answer; the edit was made without one")
            after = self._check_rows(req, paraphrases, neighbours, qs)
            with self._without_top():
                before = self._check_rows(req, paraphrases, neighbours, qs)
            return after, before, _describe(self.lm.active_edits[-1])

        with self._exclusive(wait=True, activity="checking"):
            after, before, edit = self._on_model_thread(work)
        rows = [{"metric": m, "n": n, "before": b, "after": a} for (m, n, a), (_, _, b) in zip(after, before)]
        return {"edit": edit, "rows": rows}

    def _check_rows(self, req: EditRequest, paraphrases: Sequence[str], neighbours: Sequence[str],
                    questions: Sequence[tuple[str, str]]) -> list[tuple[str, int, float | None]]:
        system = self.lm.edited

        def prefers_new(prompts: Sequence[str]) -> list[bool]:
            if not prompts:
                return []
            new = system.score(list(prompts), [req.target_new] * len(prompts))
            old = system.score(list(prompts), [req.target_true] * len(prompts))
            return [float(a.logprobs.mean()) > float(b.logprobs.mean()) for a, b in zip(new, old)]

        def mean(xs: Sequence[bool]) -> float | None:
            return round(sum(xs) / len(xs), 4) if xs else None

        rows = [("efficacy (new > old)", 1, mean(prefers_new([req.prompt]))),
                ("paraphrase (new > old)", len(paraphrases), mean(prefers_new(paraphrases))),
                ("neighbourhood (old > new)", len(neighbours), mean([not x for x in prefers_new(neighbours)]))]
        answers = system.generate([q for q, _ in questions], 8) if questions else []
        hits = [g.strip().casefold().startswith(a.strip().casefold()) for g, (_, a) in zip(answers, questions)]
        rows.append(("portability (answer first)", len(questions), mean(hits)))
        return rows


def _next_and_scores(system: Any, prompts: list[str], targets: list[str]) -> tuple[torch.Tensor, list[list[Any]]]:
    """Next-token log-probs of `prompts` and the score of every target after every prompt. A plain `LM`
    reads both from one set of forward passes (`LM.next_token_and_score`); an LM view (which may rewrite
    prompts, so it must answer each call itself) is asked twice."""
    if isinstance(system, LM):
        return system.next_token_and_score(prompts, targets)
    flat = system.score([p for _ in targets for p in prompts], [x for x in targets for _ in prompts])
    n = len(prompts)
    return system.next_token_logprobs(prompts), [flat[i * n:(i + 1) * n] for i in range(len(targets))]


def _folder(folder: str) -> Path:
    try:
        return Path(folder).expanduser()
    except RuntimeError as e:  # "~nosuchuser/..."
        raise OutputPathError(f"folder {folder!r}: {e}") from None


def _describe(edit: Edit) -> dict[str, Any]:
    r = edit.requests[0]
    return {"id": edit.id, "method": edit.method, "prompt": r.prompt, "subject": r.subject, "target_new": r.target_new,
            "target_true": r.target_true, "requests": len(edit.requests)}
