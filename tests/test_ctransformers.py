"""The ctransformers engine, through the real plugin manager and a real neuron.

The models are tiny files written by ``tests.fixtures.ggml``: a legacy GGML
gpt2 file (what this engine is for) and a GGUF llama file with a
SentencePiece tokenizer (the one GGUF kind ctransformers reads).
"""

from __future__ import annotations

import pathlib
from importlib.metadata import version

import httpx
import openai
import pytest
import trio

import cortex_ctransformers
from cortex.errors import (
    ChatTemplateMissing,
    ContextOverflow,
    HarnessError,
    InsufficientMemory,
    InvalidRequest,
    ModelLoadError,
)
from cortex.harness import (
    JsonSchema,
    LoadSpec,
    Placement,
    Sampling,
    harness_infos,
    plugin_manager,
)
from tests.fixtures.ggml import write_tiny_gpt2_ggml, write_tiny_llama_spm_gguf
from tests.neuron_helpers import running_neuron

CPU = Placement()
GREEDY = Sampling(temperature=0.0)
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
]
# The llama.cpp engine's spelling, which this engine accepts too: loads that name no
# engine pass the same options to both.
ONE_THREAD = {"n_threads": 1}
MIB = 1024 * 1024


def printable(text: bytes | str) -> bool:
    if isinstance(text, str):
        text = text.encode()
    return all(0x20 <= b <= 0x7E for b in text)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("ctransformers-models")


@pytest.fixture(scope="module")
def gpt2_path(models: pathlib.Path) -> pathlib.Path:
    """A tiny GGML gpt2 model with a context of 256."""
    return write_tiny_gpt2_ggml(models / "tiny-gpt2.bin")


@pytest.fixture(scope="module")
def eos_path(models: pathlib.Path) -> pathlib.Path:
    """A GGML gpt2 model that always answers ``<|endoftext|>`` at once."""
    return write_tiny_gpt2_ggml(models / "eos-gpt2.bin", seed=5, always_eos=True)


@pytest.fixture(scope="module")
def spm_path(models: pathlib.Path) -> pathlib.Path:
    return write_tiny_llama_spm_gguf(models / "tiny-spm.gguf")


@pytest.fixture(scope="module")
def pm():
    return plugin_manager()


@pytest.fixture
def load(pm):
    """``load(path, **spec_fields)`` through the hook; unloads what it loaded."""
    loaded = []

    def load(path, *, placement=CPU, **fields):
        fields.setdefault("model_id", "org/tiny")
        fields.setdefault("options", ONE_THREAD)
        model = pm.hook.cortex_harness_load(
            spec=LoadSpec(path=str(path), **fields), placement=placement
        )
        if model is not None:
            loaded.append(model)
        return model

    yield load
    for model in loaded:
        model.unload()


def ids(tokens) -> list[int]:
    return [t.id for t in tokens]


def text(tokens) -> bytes:
    return b"".join(t.piece for t in tokens)


# -- loading --------------------------------------------------------------------------


def test_info(pm):
    [info] = [i for i in harness_infos(pm) if i.name == "ctransformers"]
    assert info.version == version("ctransformers")
    assert info.formats == ("ggml", "gguf")
    assert info.cuda is False


def test_loads_ggml_gpt2_without_being_named(load, gpt2_path):
    model = load(gpt2_path)
    assert isinstance(model, cortex_ctransformers.CTransformersModel)
    assert model.harness == "ctransformers"
    assert model.model_type == "gpt2"
    assert model.n_ctx == model.n_ctx_train == 256
    assert model.memory_mb() >= 1
    assert load(gpt2_path, harness="ctransformers").n_ctx == 256
    # gpt2's positions are learned: the file's context wins, n_ctx_max caps use.
    assert load(gpt2_path, options={"n_ctx_max": 100}).n_ctx == 100


def test_gpt2_bpe_gguf_goes_to_llamacpp_and_is_refused_by_name(load, tiny_model_path):
    """ctransformers segfaults on this file: it must never be handed it."""
    spec = LoadSpec(model_id="org/tiny", path=str(tiny_model_path))
    assert cortex_ctransformers.cortex_harness_load(spec=spec, placement=CPU) is None
    assert load(tiny_model_path).harness == "llamacpp"
    with pytest.raises(ModelLoadError, match="tokenizer 'gpt2'") as info:
        load(tiny_model_path, harness="ctransformers")
    assert "tiny.gguf" in info.value.message
    assert str(tiny_model_path.parent) not in info.value.message


def test_spm_gguf_only_when_named(load, spm_path):
    assert load(spm_path).harness == "llamacpp"
    model = load(spm_path, harness="ctransformers", options={"threads": 1, "n_ctx": 128})
    assert model.harness == "ctransformers"
    assert model.model_type == "llama"
    assert (model.n_ctx, model.n_ctx_train) == (128, 512)
    assert load(spm_path, harness="ctransformers").n_ctx == 512
    with pytest.raises(ModelLoadError, match="model_type 'gpt2'"):
        load(spm_path, harness="ctransformers", options={"model_type": "gpt2"})


def test_other_engines_and_formats_are_not_ours(load, tmp_path, gpt2_path):
    spec = LoadSpec(model_id="m", path=str(gpt2_path), harness="llamacpp")
    assert cortex_ctransformers.cortex_harness_load(spec=spec, placement=CPU) is None
    other = tmp_path / "secret-dir" / "weights.safetensors"
    other.parent.mkdir()
    other.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    spec = LoadSpec(model_id="m", path=str(other))
    assert cortex_ctransformers.cortex_harness_load(spec=spec, placement=CPU) is None
    with pytest.raises(ModelLoadError, match="not a GGML or GGUF file") as info:
        load(other, harness="ctransformers")
    assert "secret-dir" not in info.value.message


def test_missing_file(load, tmp_path):
    with pytest.raises(ModelLoadError, match="file not found") as info:
        load(tmp_path / "secret-dir" / "gone.bin", harness="ctransformers")
    assert "gone.bin" in info.value.message
    assert str(tmp_path) not in info.value.message


def test_ggml_architecture_must_be_known(load, tmp_path):
    # A plain 'ggml' header that is not in the gpt2 layout (gpt-j's has n_rot).
    odd = tmp_path / "secret-dir" / "gptj.bin"
    odd.parent.mkdir()
    odd.write_bytes(b"lmgg" + bytes(100))
    with pytest.raises(ModelLoadError, match="set the model_type option") as info:
        load(odd)
    assert "gptj.bin" in info.value.message and "secret-dir" not in info.value.message
    # Named gpt2, the bad header is caught before ctransformers sees it.
    with pytest.raises(ModelLoadError, match="not a valid gpt2 GGML header"):
        load(odd, options={"model_type": "gpt2"})
    with pytest.raises(ModelLoadError, match="failed to load it as 'gptj'") as info:
        load(odd, options={"model_type": "gptj"})
    assert "secret-dir" not in info.value.message


def test_options_are_checked(load, gpt2_path):
    with pytest.raises(ModelLoadError, match="'n_gpu_layers'"):
        load(gpt2_path, options={"n_gpu_layers": 1})
    with pytest.raises(ModelLoadError, match="'threads'"):
        load(gpt2_path, options={"threads": "two"})
    with pytest.raises(ModelLoadError, match="'model_type'"):
        load(gpt2_path, options={"model_type": "bert"})
    with pytest.raises(ModelLoadError, match="'lib'"):
        load(gpt2_path, options={"lib": "/tmp/evil.so"})
    with pytest.raises(ModelLoadError, match="one sequence at a time"):
        load(gpt2_path, options={"parallel": 4})
    with pytest.raises(ModelLoadError, match="set twice"):
        load(gpt2_path, options={"threads": 1, "n_threads": 1})
    with pytest.raises(ModelLoadError, match="'no-such-format'"):
        load(gpt2_path, chat_format="no-such-format")
    # Aliases of the llama.cpp engine's names, and explicit spellings.
    model = load(
        gpt2_path,
        options={
            "n_threads": 1,
            "n_batch": 16,
            "parallel": 1,
            "model_type": "GPT-2",
            "lib": "basic",
        },
    )
    assert model.parallel == 1
    assert model.model_type == "gpt2"


def test_memory_budget(load, gpt2_path):
    with pytest.raises(InsufficientMemory, match="needs at least 1 MiB"):
        load(gpt2_path, placement=Placement(memory_budget_mb=0))


@pytest.mark.parametrize("which", ["gpt2", "spm"])
def test_a_refusal_for_memory_says_the_least_that_loads(load, pm, models, which):
    """Weights that fit but not the context beside them: a 503 that says how much loads.

    gpt2 keeps the file's context whatever the budget; a GGUF one shrinks a
    context taken from the file to fit, but not one asked for.
    """
    if which == "gpt2":
        # 2 layers x 32 x 2 x 4 bytes: 512 bytes of KV a token, 4 MiB for 8192.
        path = write_tiny_gpt2_ggml(models / "long-gpt2.bin", n_ctx=8192)
        fields: dict = {}
    else:
        # 2 layers x 64 x 2 x 2 bytes: 512 bytes a token, 4 MiB for 8192.
        path = write_tiny_llama_spm_gguf(models / "spm-8k.gguf")
        fields = {"harness": "ctransformers", "options": {"threads": 1, "n_ctx": 8192}}
    weights_mb = -(-path.stat().st_size // MIB)
    with pytest.raises(InsufficientMemory) as info:
        load(path, placement=Placement(memory_budget_mb=weights_mb), **fields)
    refused = info.value
    assert refused.status == 503 and refused.code == "insufficient_memory"
    assert f"needs at least {refused.need_mb} MiB" in refused.message
    assert f"{weights_mb} MiB is free for it" in refused.message
    assert refused.need_mb > weights_mb
    # The figure the neuron asks for before a load, in any budget: the same.
    fields.setdefault("options", ONE_THREAD)
    for budget in (0, weights_mb, None):
        spec = LoadSpec(model_id="org/tiny", path=str(path), **fields)
        estimate = pm.hook.cortex_harness_need_mb(
            spec=spec, placement=Placement(memory_budget_mb=budget)
        )
        assert estimate == refused.need_mb
    with pytest.raises(InsufficientMemory):
        load(path, placement=Placement(memory_budget_mb=refused.need_mb - 1), **fields)
    model = load(path, placement=Placement(memory_budget_mb=refused.need_mb), **fields)
    assert model.memory_mb() <= refused.need_mb


# -- the loaded model -----------------------------------------------------------------


def test_tokenize(load, gpt2_path, spm_path):
    model = load(gpt2_path)
    plain = model.tokenize("the cat in the hat", add_bos=False)
    assert len(plain) < len("the cat in the hat")  # multi-byte tokens apply
    assert model.tokenize("the cat in the hat") == plain  # gpt2 has no BOS
    # Longer in bytes than in characters: LLM.tokenize's own buffer overflows here.
    wide = "日本語" * 100
    assert len(model.tokenize(wide)) == len(wide.encode())

    spm = load(spm_path, harness="ctransformers")
    no_bos = spm.tokenize("the cat", add_bos=False)
    assert spm.tokenize("the cat") == [1, *no_bos]
    assert len(spm.tokenize(wide, add_bos=False)) <= len(wide.encode()) + 1


def test_render_chat(load, gpt2_path):
    with pytest.raises(ChatTemplateMissing, match="chat_format"):
        load(gpt2_path).render_chat(MESSAGES)
    chatml = load(gpt2_path, chat_format="chatml").render_chat(MESSAGES)
    assert chatml.text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHello there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert "<|im_end|>" in chatml.stop
    plain = load(gpt2_path, options={"threads": 1, "chat_format": "plain"}).render_chat(MESSAGES)
    assert plain.text == "system: Be brief.\nuser: Hello there\nassistant:"
    assert plain.stop == ("\nuser:",)
    llama2 = load(gpt2_path, chat_format="llama-2").render_chat(MESSAGES)
    assert llama2.text == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHello there [/INST]"
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert load(gpt2_path, chat_format="plain").render_chat(parts).text == "user: Hi\nassistant:"
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {}}}
    with pytest.raises(InvalidRequest, match="tools"):
        load(gpt2_path, chat_format="chatml").render_chat(MESSAGES, tools=[tool])


def test_render_prefilled(load, gpt2_path):
    """A prefill starts the answer where the format writes an assistant's text."""
    chatml = load(gpt2_path, chat_format="chatml").render_prefilled(MESSAGES, "Hi,")
    assert chatml.text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHello there<|im_end|>\n"
        "<|im_start|>assistant\nHi,"
    )
    plain = load(gpt2_path, chat_format="plain")
    assert plain.render_prefilled(MESSAGES, "Hi,").text.endswith("\nassistant: Hi,")
    assert plain.render_prefilled(MESSAGES, "").text.endswith("\nassistant:")
    llama2 = load(gpt2_path, chat_format="llama-2").render_prefilled(MESSAGES, "Hi,")
    assert llama2.text.endswith("Hello there [/INST] Hi,")
    with pytest.raises(ChatTemplateMissing):
        load(gpt2_path).render_prefilled(MESSAGES, "Hi,")


@pytest.mark.parametrize("which", ["gpt2", "spm"])
def test_generate_until_the_context_is_full(load, gpt2_path, spm_path, which):
    if which == "gpt2":
        model = load(gpt2_path)
    else:
        model = load(spm_path, harness="ctransformers", options={"threads": 1, "n_ctx": 128})
    prompt = model.tokenize("Once upon a time")
    tokens = list(model.generate(prompt, GREEDY))
    assert len(prompt) + len(tokens) == model.n_ctx
    assert printable(text(tokens))
    # Greedy is deterministic, and a closed generation leaves the context reusable.
    first = model.generate(prompt, GREEDY)
    assert [next(first).id for _ in range(5)] == ids(tokens[:5])
    first.close()
    assert ids(model.generate(prompt, GREEDY)) == ids(tokens)


def test_sampling_with_a_seed_repeats(load, gpt2_path):
    model = load(gpt2_path)
    prompt = model.tokenize("Once upon a time")
    seeded = Sampling(temperature=1.5, top_k=0, top_p=0.95, repeat_penalty=1.1, seed=42)
    first = ids(model.generate(prompt, seeded))
    assert ids(model.generate(prompt, seeded)) == first
    assert ids(model.generate(prompt, Sampling(temperature=1.5, seed=43))) != first
    # Not one random draw reused for every token (its sampler reseeds per call).
    assert first != ids(model.generate(prompt, GREEDY))


def test_generate_ends_at_end_of_text(load, eos_path):
    model = load(eos_path)
    assert list(model.generate(model.tokenize("Hi"), GREEDY)) == []


def test_generate_refuses(load, gpt2_path):
    model = load(gpt2_path)
    with pytest.raises(InvalidRequest, match="empty"):
        list(model.generate([], GREEDY))
    with pytest.raises(InvalidRequest, match="token ids"):
        list(model.generate([1, 100_000], GREEDY))
    with pytest.raises(ContextOverflow):
        list(model.generate([65] * 256, GREEDY))
    with pytest.raises(InvalidRequest, match="grammar"):
        list(model.generate([65], Sampling(constraint=JsonSchema(None))))


def test_unload(load, gpt2_path):
    model = load(gpt2_path)
    model.unload()
    model.unload()
    with pytest.raises(HarnessError, match="unloaded"):
        model.tokenize("x")


# -- through a neuron's OpenAI routes -------------------------------------------------


@pytest.fixture
async def neuron(gpt2_path: pathlib.Path, eos_path: pathlib.Path):
    models = [("gpt2", str(gpt2_path)), ("eos", str(eos_path))]
    async with running_neuron(models, options=ONE_THREAD) as handle:
        async with httpx.AsyncClient(base_url=handle.url, timeout=30) as http:
            with trio.fail_after(30):
                response = await http.post(
                    "/models/load",
                    json={
                        "model_id": "gpt2-chat",
                        "source": str(gpt2_path),
                        "chat_format": "chatml",
                        "options": ONE_THREAD,
                    },
                )
            assert response.status_code == 200, response.text
        yield handle


@pytest.fixture
async def client(neuron):
    async with openai.AsyncOpenAI(
        base_url=neuron.url + "/v1", api_key="unused", max_retries=0
    ) as client:
        yield client


async def test_models_are_served_by_ctransformers(neuron) -> None:
    async with httpx.AsyncClient(base_url=neuron.url, timeout=30) as http:
        with trio.fail_after(10):
            models = (await http.get("/models")).json()
            discovery = (await http.get("/discovery")).json()
    assert {m["id"]: m["harness"] for m in models} == {
        "gpt2": "ctransformers",
        "eos": "ctransformers",
        "gpt2-chat": "ctransformers",
    }
    assert "ctransformers" in [h["name"] for h in discovery["harnesses"]]


async def test_completions_and_streaming(client: openai.AsyncOpenAI) -> None:
    with trio.fail_after(30):
        whole = await client.completions.create(
            model="gpt2", prompt="Once upon a time", max_tokens=20, temperature=0
        )
        stream = await client.completions.create(
            model="gpt2", prompt="Once upon a time", max_tokens=20, temperature=0, stream=True
        )
        chunks = [chunk async for chunk in stream]
    choice = whole.choices[0]
    assert choice.finish_reason == "length"
    assert whole.usage.completion_tokens == 20
    assert choice.text and printable(choice.text)
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_completion_ends_at_end_of_text(client: openai.AsyncOpenAI) -> None:
    with trio.fail_after(30):
        reply = await client.completions.create(model="eos", prompt="Hi", max_tokens=20)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].text == ""
    assert reply.usage.completion_tokens == 0


async def test_max_tokens_clamped_to_context(client: openai.AsyncOpenAI) -> None:
    with trio.fail_after(30):
        reply = await client.completions.create(
            model="gpt2", prompt="Hi", max_tokens=100_000, temperature=0
        )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens == 256


async def test_chat_with_chat_format(client: openai.AsyncOpenAI) -> None:
    with trio.fail_after(30):
        whole = await client.chat.completions.create(
            model="gpt2-chat", messages=MESSAGES, max_tokens=12, temperature=0
        )
        stream = await client.chat.completions.create(
            model="gpt2-chat",
            messages=MESSAGES,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        with pytest.raises(openai.BadRequestError) as missing:
            await client.chat.completions.create(model="gpt2", messages=MESSAGES)
    assert whole.choices[0].finish_reason == "length"
    assert printable(whole.choices[0].message.content)
    assert chunks[-1].usage.completion_tokens == 12
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert streamed == whole.choices[0].message.content
    assert missing.value.body["code"] == "chat_template_missing"


async def test_two_gpt2_models_at_once(client: openai.AsyncOpenAI) -> None:
    """ggml's gpt2 evaluator has a process-wide scratch buffer: without the
    engine's per-architecture lock this crashes the neuron."""
    alone = {}
    for model in ("gpt2", "gpt2-chat"):
        reply = await client.completions.create(
            model=model, prompt="Go", max_tokens=100, temperature=0
        )
        alone[model] = reply.choices[0].text
    together: dict[str, list[str]] = {"gpt2": [], "gpt2-chat": []}

    async def ask(model: str) -> None:
        reply = await client.completions.create(
            model=model, prompt="Go", max_tokens=100, temperature=0
        )
        together[model].append(reply.choices[0].text)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(ask, "gpt2")
                nursery.start_soon(ask, "gpt2-chat")
    assert together == {model: [text] * 3 for model, text in alone.items()}


async def test_gpt2_bpe_gguf_named_for_ctransformers_fails_cleanly(
    neuron, client: openai.AsyncOpenAI, tiny_model_path: pathlib.Path
) -> None:
    async with httpx.AsyncClient(base_url=neuron.url, timeout=30) as http:
        with trio.fail_after(30):
            refused = await http.post(
                "/models/load",
                json={
                    "model_id": "bpe",
                    "source": str(tiny_model_path),
                    "harness": "ctransformers",
                    "options": ONE_THREAD,
                },
            )
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "unsupported_model_format"
    assert "tokenizer 'gpt2'" in refused.json()["error"]["message"]
    with trio.fail_after(30):
        reply = await client.completions.create(model="gpt2", prompt="Hi", max_tokens=3)
    assert reply.usage.completion_tokens == 3
