"""The llama.cpp engine, driven through the real plugin manager and entry point."""

from __future__ import annotations

import os
import threading
import time

import llama_cpp
import pytest

from cortex.chat_template import TemplateSupport, tools_text
from cortex.errors import (
    ChatTemplateMissing,
    ContextOverflow,
    HarnessError,
    InsufficientMemory,
    InvalidModelOptions,
    InvalidRequest,
    ModelLoadError,
)
from cortex.harness import (
    ChatPrompt,
    JsonSchema,
    LoadSpec,
    Placement,
    Sampling,
    harness_infos,
    plugin_manager,
)
from cortex_llamacpp.model import use_extra_buffers
from cortex_llamacpp.options import (
    MIB,
    KvLayout,
    LoadOptions,
    kv_layout,
    physical_cores,
    plan_n_ctx,
)

CPU = Placement()
GREEDY = Sampling(temperature=0.0)
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
]


@pytest.fixture(scope="module")
def pm():
    # Only this engine: the ctransformers plugin claims GGML-era files itself.
    return plugin_manager(blocked=["ctransformers"])


@pytest.fixture
def load(pm):
    """``load(path, **spec_fields)`` through the hook; unloads what it loaded."""
    loaded = []

    def load(path, *, placement=CPU, **fields):
        fields.setdefault("model_id", "org/tiny")
        model = pm.hook.cortex_harness_load(
            spec=LoadSpec(path=str(path), **fields), placement=placement
        )
        if model is not None:
            loaded.append(model)
        return model

    yield load
    for model in loaded:
        model.unload()


def take(iterator, n):
    out = []
    for token in iterator:
        out.append(token)
        if len(out) == n:
            break
    iterator.close()
    return out


def test_info(pm):
    [info] = [i for i in harness_infos(pm) if i.name == "llamacpp"]
    assert info.version == llama_cpp.__version__
    assert info.formats == ("gguf",)
    assert info.cuda == llama_cpp.llama_supports_gpu_offload()


def test_load_defaults(load, tiny_model_path):
    model = load(tiny_model_path)
    assert model.model_id == "org/tiny"
    assert model.harness == "llamacpp"
    assert model.n_ctx == 512  # the trained length
    assert model.n_ctx_train == 512
    assert model.memory_mb() >= 1


def test_missing_file(load, tmp_path):
    with pytest.raises(ModelLoadError) as info:
        load(tmp_path / "secret-dir" / "gone.gguf")
    assert "org/tiny" in info.value.message
    assert "gone.gguf" in info.value.message
    assert str(tmp_path) not in info.value.message


@pytest.mark.parametrize("keep", [0.002, 0.9], ids=["header", "tensors"])
def test_corrupt_gguf(load, tmp_path, tiny_model_path, keep):
    path = tmp_path / "broken.gguf"
    data = tiny_model_path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError) as info:
        load(path)
    assert info.value.status == 422 and info.value.code == "invalid_model_file"
    assert "broken.gguf" in info.value.message
    assert str(tmp_path) not in info.value.message


def test_other_engine_or_format_is_not_ours(load, tmp_path, tiny_model_path):
    assert load(tiny_model_path, harness="ctransformers") is None
    ggml = tmp_path / "model.bin"
    ggml.write_bytes(b"lmgg" + bytes(100))
    assert load(ggml) is None
    with pytest.raises(ModelLoadError, match="not a GGUF") as info:
        load(ggml, harness="llamacpp")
    assert info.value.status == 422 and info.value.code == "unsupported_model_format"


def test_unknown_option(load, tiny_model_path):
    with pytest.raises(ModelLoadError, match="'n_ctxx'"):
        load(tiny_model_path, options={"n_ctxx": 1024})
    with pytest.raises(ModelLoadError, match="'flash_attn'"):
        load(tiny_model_path, options={"flash_attn": "yes"})
    with pytest.raises(ModelLoadError, match="'extra_buffers': expected 'auto', 'on' or 'off'"):
        load(tiny_model_path, options={"extra_buffers": True})


def test_extra_buffers_auto_is_off_only_where_the_build_has_amx():
    native_amx = b"CPU : SSE3 = 1 | AVX512 = 1 | AVX512_VNNI = 1 | AMX_INT8 = 1 | REPACK = 1 |"
    native = b"CPU : SSE3 = 1 | AVX512 = 1 | AVX512_VNNI = 1 | REPACK = 1 |"
    assert use_extra_buffers("auto", native_amx) is False
    assert use_extra_buffers("auto", native) is True
    assert use_extra_buffers("on", native_amx) is True
    assert use_extra_buffers("off", native) is False


def test_physical_cores_count_hyperthreads_once():
    info = "\n\n".join(
        f"processor\t: {cpu}\nphysical id\t: 0\ncore id\t\t: {cpu // 2}" for cpu in range(8)
    )
    assert physical_cores(info, allowed=set(range(8))) == 4
    assert physical_cores(info, allowed={0, 1, 2}) == 2
    assert physical_cores("", allowed={0, 1}) == 2  # nothing readable: the logical CPUs


def test_n_ctx_options(load, tiny_model_factory):
    path = tiny_model_factory(n_ctx=4096)
    assert load(path).n_ctx == 4096
    assert load(path, options={"n_ctx_max": 1000}).n_ctx == 768
    assert load(path, options={"n_ctx": 300}).n_ctx == 512  # rounded up to 256s
    odd = tiny_model_factory("odd.gguf", n_ctx=1000)
    assert load(odd).n_ctx == 768


def test_n_ctx_fits_memory_budget(load, tiny_model_factory):
    path = tiny_model_factory(n_ctx=65536)
    # f16 KV of 2 layers x 64 (K) + 64 (V) = 512 bytes/token: 2048 tokens per MiB.
    size_mb = path.stat().st_size / 2**20
    budget = Placement(memory_budget_mb=int(size_mb) + 3)
    model = load(path, placement=budget, options={"parallel": 1})
    assert model.n_ctx % 256 == 0
    assert 2048 <= model.n_ctx <= 3 * 2048 + 256
    assert model.memory_mb() <= int(size_mb) + 3
    # Batched, the slots share one pool of n_ctx cells: it does not shrink
    # with parallel (only by the small context that serves tokenize).
    batched = load(path, placement=budget, options={"parallel": 4})
    assert batched.parallel == 4
    assert batched.n_ctx == batched._decoder.kv_cells
    assert model.n_ctx - 512 <= batched.n_ctx <= model.n_ctx
    assert batched.memory_mb() <= int(size_mb) + 3
    # One stream per slot holds parallel x n_ctx cells: n_ctx shrinks to fit.
    streams = load(path, placement=budget, options={"parallel": 4, "kv_unified": False})
    assert streams.n_ctx % 256 == 0
    assert 512 <= 4 * streams.n_ctx <= model.n_ctx + 4 * 256
    # A pool asked for explicitly must fit too.
    with pytest.raises(InsufficientMemory, match="65792 KV cells") as info:
        load(path, placement=budget, options={"parallel": 4, "kv_cells": 65536})
    # 33 MiB of file and cells, and a host tier of 1/8 of the budget.
    assert -(-(path.stat().st_size + (65536 + 256) * 512) // MIB) == 33
    assert info.value.need_mb == 37 and 37 // 8 == 4
    with pytest.raises(InsufficientMemory, match="0 MiB is free for it"):
        load(path, placement=Placement(memory_budget_mb=0))


@pytest.mark.parametrize(
    "options",
    [
        {"parallel": 1},
        {"parallel": 1, "n_ctx": 5000},
        {"parallel": 4},
        {"parallel": 4, "kv_unified": False},
        {"parallel": 4, "kv_cells": 8192},
        {"parallel": 4, "host_cache_mb": 3},
    ],
)
def test_a_refusal_for_memory_says_the_least_that_loads(load, tiny_model_factory, options):
    """Weights that fit but no context beside them: the engine's plan refuses.

    With what it says it needs (a gateway evicts for exactly that) it loads,
    the host tier that grows with the budget included; one MiB less does not.
    """
    # 8 layers x 256 x 4 bytes: 8 KiB of KV a token, 2 MiB for the least 256 cells.
    path = tiny_model_factory(n_ctx=8192, n_layer=8, n_embd=256)
    options = {"n_threads": 1, **options}
    weights_mb = path.stat().st_size // MIB
    with pytest.raises(InsufficientMemory) as info:
        load(path, placement=Placement(memory_budget_mb=weights_mb + 1), options=options)
    refused = info.value
    assert refused.status == 503 and refused.code == "insufficient_memory"
    assert f"needs at least {refused.need_mb} MiB" in refused.message
    assert refused.need_mb > weights_mb + 1
    with pytest.raises(InsufficientMemory):
        load(path, placement=Placement(memory_budget_mb=refused.need_mb - 1), options=options)
    model = load(path, placement=Placement(memory_budget_mb=refused.need_mb), options=options)
    assert model.memory_mb() <= refused.need_mb
    if "n_ctx" in options:
        assert model.n_ctx == 5120  # asked for: it never shrinks


def test_plan_n_ctx():
    plan = dict(model_id="m", requested=None, weights_bytes=0, kv_per_token=1, budget_mb=None)
    assert plan_n_ctx(**plan, n_ctx_train=131072, n_ctx_max=32768) == 32768
    assert plan_n_ctx(**plan, n_ctx_train=None, n_ctx_max=8192) == 8192
    assert plan_n_ctx(**plan, n_ctx_train=100, n_ctx_max=8192) == 256
    fit = {**plan, "kv_per_token": 1024, "budget_mb": 1}
    assert plan_n_ctx(**fit, n_ctx_train=4096, n_ctx_max=8192) == 1024


def test_kv_layout_auto_takes_per_slot_streams_where_they_fit():
    def layout(budget_mb, **options):
        return kv_layout(
            LoadOptions(parallel=4, **options),
            n_ctx=1024,
            kv_per_token=MIB // 1024,  # 1 MiB per 1024 cells
            other_bytes=10 * MIB,
            budget_mb=budget_mb,
        )

    # 4 x 1024 cells are 4 MiB, beside 10 MiB of weights: 3 MiB more than
    # one pool of 1024, which may be at most 1/8 of the budget.
    assert layout(24) == KvLayout(
        unified=False, reason="4096 cells fit: 14 MiB of the 24 MiB budget"
    )
    assert layout(23) == KvLayout(
        unified=True,
        reason="per-slot streams (4096 cells) would take 3 MiB more than one pool, "
        "over 1/8 of the 23 MiB budget",
    )
    assert layout(13).unified
    assert "would need 14 MiB, over the 13 MiB budget" in layout(13).reason
    assert not layout(None).unified  # no memory plan: nothing limits it
    # Explicit values win; kv_cells only means something in a unified pool.
    assert layout(24, kv_unified=True) == KvLayout(unified=True, reason="kv_unified = true")
    assert not layout(13, kv_unified=False).unified
    assert layout(24, kv_cells=2048) == KvLayout(unified=True, reason="kv_cells is set")
    assert not layout(24, kv_cells=2048, kv_unified=False).unified
    assert layout(24).name == "per-slot" and layout(13).name == "unified"


def test_kv_unified_auto_loads(load, tiny_model_factory, caplog):
    path = tiny_model_factory(n_ctx=4096)
    # f16 KV of 2 layers x 64 (K) + 64 (V) = 512 bytes/token: 2048 tokens per MiB.
    size_mb = path.stat().st_size / 2**20
    # 4 x 4096 + 256 cells are 8.1 MiB, 6 MiB more than one pool: 50 MiB
    # more than the file fits them and has 8 x 6 MiB; 6 fits only one pool.
    roomy = Placement(memory_budget_mb=int(size_mb) + 50)
    tight = Placement(memory_budget_mb=int(size_mb) + 6)
    # (No host tier: on a CPU host it counts in the budget too.)
    options = {"parallel": 4, "host_cache_mb": 0}
    with caplog.at_level("INFO", logger="cortex_llamacpp.model"):
        streams = load(path, placement=roomy, options=options)
        # What does not fit takes the unified pool: the context does not shrink.
        pool = load(path, placement=tight, options=options)
        # Nor does what fits but would take over 1/8 of the budget beyond one pool.
        assert size_mb + 12 < 8 * 6
        middle = Placement(memory_budget_mb=int(size_mb) + 12)
        assert load(path, placement=middle, options=options).kv_layout == "unified"
    assert streams.kv_layout == "per-slot"
    assert streams.n_ctx == 4096
    assert streams._decoder.kv_cells == 4 * 4096 and not streams._decoder._kv_unified
    # The file plus 4 x 4096 cells and the small tokenize context of 256.
    assert streams.memory_mb() == -(-(path.stat().st_size + (4 * 4096 + 256) * 512) // MIB)
    assert pool.kv_layout == "unified"
    assert pool.n_ctx == 4096 and pool._decoder.kv_cells == 4096 and pool._decoder._kv_unified
    assert pool.memory_mb() == -(-(path.stat().st_size + (4096 + 256) * 512) // MIB)
    logged = [r.getMessage() for r in caplog.records if "KV cache" in r.getMessage()]
    assert "per-slot KV cache, n_ctx 4096 x 4 slots (16384 cells fit: " in logged[0]
    assert "unified KV cache, n_ctx 4096 x 4 slots (per-slot streams (16384 cells) " in logged[1]
    assert "over the" in logged[1]
    assert "6 MiB more than one pool, over 1/8 of the " in logged[2]
    # Explicit settings win; kv_cells asks for the pool.
    assert load(path, placement=roomy, options={"parallel": 4, "kv_unified": True}).kv_layout == (
        "unified"
    )
    assert load(path, placement=roomy, options={"parallel": 4, "kv_cells": 8192}).kv_layout == (
        "unified"
    )
    forced = load(path, placement=tight, options={"parallel": 4, "kv_unified": False})
    assert forced.kv_layout == "per-slot" and forced.n_ctx < 4096  # forced: n_ctx shrinks
    # No memory plan (an embedding caller): per-slot streams.
    assert load(path, options={"parallel": 4}).kv_layout == "per-slot"
    # One sequence has no slots to lay out.
    assert load(path, placement=roomy, options={"parallel": 1}).kv_layout is None


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_kv_unified_takes_true_false_or_auto(load, tiny_model_path, value):
    with pytest.raises(InvalidModelOptions, match="'kv_unified': expected true, false or 'auto'"):
        load(tiny_model_path, options={"kv_unified": value})


def test_tokenize(load, tiny_model_path):
    model = load(tiny_model_path)
    plain = model.tokenize("the cat", add_bos=False)
    assert len(plain) < len("the cat")  # merges apply
    with_bos = model.tokenize("the cat")
    assert with_bos[1:] == plain and with_bos[0] != plain[0]
    special = model.tokenize("<|im_start|>", add_bos=False, special=True)
    assert len(special) == 1
    assert len(model.tokenize("<|im_start|>", add_bos=False, special=False)) > 1


def test_render_chat_template(load, tiny_model_path):
    model = load(tiny_model_path)
    prompt = model.render_chat(MESSAGES)
    assert prompt == ChatPrompt(
        text="<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHello there<|im_end|>\n"
        "<|im_start|>assistant\n",
        stop=("</s>",),
        add_bos=True,
        special=True,
    )
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {}}}
    with_tools = model.render_chat(MESSAGES, tools=[tool])
    assert '"name": "get_time"' in with_tools.text


def test_render_chat_without_template(load, no_template_model_path):
    model = load(no_template_model_path)
    with pytest.raises(ChatTemplateMissing, match="chat_format"):
        model.render_chat(MESSAGES)
    model = load(no_template_model_path, chat_format="chatml")
    prompt = model.render_chat(MESSAGES)
    assert prompt.text.endswith("<|im_start|>assistant\n")
    assert "<|im_end|>" in prompt.stop
    with pytest.raises(ModelLoadError, match="'no-such-format'"):
        load(no_template_model_path, chat_format="no-such-format")


TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {}}}
CALL_TURNS = [
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "noon"},
]


@pytest.mark.parametrize("kind", ["raises on system", "gemma chat_format drops system"])
def test_system_and_tools_reach_a_template_without_them(
    load, no_system_model_path, no_template_model_path, kind
):
    """A template with no system role and no tools still sees both, as user text."""
    if kind == "raises on system":
        model = load(no_system_model_path)
    else:
        model = load(no_template_model_path, chat_format="gemma")
    assert model.template_support == TemplateSupport(system=False, tools=False)
    assert model.tool_format == "hermes"
    text = model.render_chat(MESSAGES).text
    assert "<start_of_turn>user\nBe brief.\n\nHello there<end_of_turn>" in text
    text = model.render_chat([*MESSAGES, *CALL_TURNS], tools=[TOOL]).text
    assert f"<start_of_turn>user\nBe brief.\n\n{tools_text([TOOL])}\n\nHello there" in text
    assert (
        '<start_of_turn>model\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}'
        "\n</tool_call><end_of_turn>"
    ) in text
    assert "<start_of_turn>user\n<tool_response>\nnoon\n</tool_response><end_of_turn>" in text


def test_template_that_takes_everything_is_left_alone(load, tiny_model_path):
    model = load(tiny_model_path, options={"tool_format": "mistral"})
    assert model.template_support == TemplateSupport(system=True, tools=True)
    assert model.tool_format == "mistral"
    text = model.render_chat(MESSAGES, tools=[TOOL]).text
    assert text.startswith("<|im_start|>system\n# Tools\n{")
    assert "<tools>" not in text


def test_configured_tool_format_wins_over_the_fallback(load, no_system_model_path):
    assert load(no_system_model_path, options={"tool_format": "llama3"}).tool_format == "llama3"


def test_greedy_matches_create_completion(load, tiny_model_path):
    model = load(tiny_model_path)
    prompt = model.tokenize(model.render_chat(MESSAGES).text)
    tokens = take(model.generate(prompt, GREEDY), 40)
    assert len(tokens) == 40

    reference = llama_cpp.Llama(
        model_path=str(tiny_model_path), n_ctx=512, n_threads=os.cpu_count(), verbose=False
    )
    try:
        completion = reference.create_completion(prompt, temperature=0, max_tokens=40)
        # Its KV cache holds the prompt and every generated token but the last.
        evaluated = reference.input_ids[len(prompt) : reference.n_tokens].tolist()
    finally:
        reference.close()
    assert completion["usage"]["completion_tokens"] == 40
    assert [t.id for t in tokens[:39]] == evaluated
    assert b"".join(t.piece for t in tokens).decode() == completion["choices"][0]["text"]


def test_close_early_then_generate_again(load, tiny_model_path):
    model = load(tiny_model_path)
    prompt = model.tokenize("Once upon a time")
    first = take(model.generate(prompt, GREEDY), 30)
    early = take(model.generate(prompt, GREEDY), 5)
    assert early == first[:5]
    # Continue from what was generated (a prefix hit), then from scratch.
    more = take(model.generate(prompt + [t.id for t in first[:10]], GREEDY), 5)
    assert more == first[10:15]
    other = take(model.generate(model.tokenize("Something else"), GREEDY), 5)
    assert len(other) == 5
    assert take(model.generate(prompt, GREEDY), 30) == first


def test_seeded_sampling_is_reproducible(load, tiny_model_path):
    model = load(tiny_model_path)
    prompt = model.tokenize("Hello")
    sampling = Sampling(temperature=1.0, seed=42)
    first = take(model.generate(prompt, sampling), 20)
    assert take(model.generate(prompt, sampling), 20) == first
    assert all(32 <= byte < 127 for t in first for byte in t.piece)


def test_grammar(load, tiny_model_path):
    model = load(tiny_model_path)
    yes_no = JsonSchema({"enum": ["yes", "no"]})
    sampling = Sampling(temperature=1.0, seed=1, constraint=yes_no)
    pieces = b"".join(t.piece for t in model.generate(model.tokenize("Answer:"), sampling))
    assert pieces in (b'"yes"', b'"no"')
    # llama-cpp-python would pass a NULL sampler on and crash the process.
    with pytest.raises(InvalidRequest, match="grammar"):
        model._grammar("root ::= (")
    with pytest.raises(InvalidRequest, match="grammar"):
        next(model.generate([1, 2], Sampling(constraint=JsonSchema({"$ref": "#/nope"}))))
    assert len(take(model.generate(model.tokenize("Hi"), GREEDY), 3)) == 3


@pytest.mark.parametrize("kv_unified", [True, "auto"], ids=["unified", "per-slot"])
def test_generation_stops_at_full_context(load, tiny_model_path, kv_unified):
    model = load(tiny_model_path, options={"kv_unified": kv_unified})
    assert model.kv_layout == ("unified" if kv_unified is True else "per-slot")
    prompt = model.tokenize("x" * 600, add_bos=False)[: model.n_ctx - 8]
    assert len(list(model.generate(prompt, GREEDY))) == 8
    with pytest.raises(ContextOverflow):
        next(model.generate([1] * model.n_ctx, GREEDY))
    with pytest.raises(InvalidRequest, match="token ids"):
        next(model.generate([1, 10**6], GREEDY))


def test_two_models_side_by_side(load, tiny_model_factory):
    small = load(tiny_model_factory("a.gguf", name="a", seed=1), model_id="a")
    big = load(tiny_model_factory("b.gguf", name="b", seed=2, n_embd=128, n_layer=3), model_id="b")
    prompt = small.tokenize("Hello")
    a = take(small.generate(prompt, GREEDY), 20)
    b = take(big.generate(prompt, GREEDY), 20)
    assert a != b
    assert take(small.generate(prompt, GREEDY), 20) == a
    assert big.memory_mb() >= small.memory_mb()


def test_unload(load, tiny_model_path):
    model = load(tiny_model_path)
    model.unload()
    model.unload()  # idempotent
    with pytest.raises(HarnessError, match="unloaded"):
        model.tokenize("hi")
    with pytest.raises(HarnessError, match="unloaded"):
        next(model.generate([1, 2], GREEDY))


def test_fixture_models_differ(tiny_model_factory):
    a = tiny_model_factory("a.gguf", seed=1).read_bytes()
    b = tiny_model_factory("b.gguf", seed=2).read_bytes()
    assert a != b


#: A prompt of about 1,900 SmolLM2 tokens: seconds of prompt processing on one thread.
LONG_PROMPT = " ".join(["apple river stone blue seven quick moon table"] * 240)


@pytest.mark.parametrize("parallel", [1, 4])
def test_cancel_stops_the_prompt_between_chunks(load, smollm2_path, parallel):
    model = load(
        smollm2_path, options={"n_threads": 1, "n_ctx": 2048, "n_batch": 64, "parallel": parallel}
    )
    prompt = model.tokenize(LONG_PROMPT)
    assert 1800 < len(prompt) < 2000

    def evaluated() -> int:
        if model._decoder is not None:
            return model._decoder.statistics().prompt_tokens
        return model._llama.n_tokens

    generation = model.generate(prompt, GREEDY)
    ended = threading.Event()
    tokens = []

    def consume() -> None:
        tokens.extend(generation)
        ended.set()

    consumer = threading.Thread(target=consume)
    consumer.start()
    # Wait until the prompt is under way (a chunk or two in), then cancel.
    deadline = time.monotonic() + 60
    while evaluated() < 128 and time.monotonic() < deadline:
        time.sleep(0.01)
    generation.cancel()
    assert ended.wait(10), "the generation did not end after cancel()"
    consumer.join()
    generation.close()
    assert tokens == []
    # At most the chunk in hand when the cancel came, never the whole prompt.
    assert evaluated() < len(prompt) // 2
    if model._decoder is not None:
        assert model._decoder.statistics().active == 0
    # The model serves the next request as usual.
    assert len(take(model.generate(model.tokenize("Hello"), GREEDY), 3)) == 3


@pytest.mark.parametrize("parallel", [1, 2])
def test_progress_moves_with_every_chunk_of_a_long_prompt(load, tiny_model_factory, parallel):
    """A 3,000-token prompt is evaluated in steps of at most ``n_batch`` tokens,
    each counted in ``progress()``: a long prefill is never one silent step."""
    path = tiny_model_factory(n_ctx=4096)
    model = load(
        path, options={"n_threads": 1, "n_ctx": 4096, "n_batch": 256, "parallel": parallel}
    )
    prompt = model.tokenize("apple river stone blue seven quick moon table " * 400)[:3000]
    assert len(prompt) == 3000
    before = model.progress()
    generation = model.generate(prompt, GREEDY)
    try:
        next(generation)
        # ceil(3000 / 256) = 12 prompt chunks before the first token.
        assert model.progress() - before >= 12
        if model._decoder is not None:
            assert model._decoder.statistics().max_batch <= 256
        next(generation)
        assert model.progress() - before >= 13
    finally:
        generation.close()
