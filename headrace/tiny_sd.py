"""A tiny random-weight Stable Diffusion pipeline: its images are noise.

No Stable Diffusion checkpoint can be downloaded where headrace is built and
tested, so this module builds one from small configs with diffusers: the real
UNet, VAE, CLIP text encoder, tokenizer and scheduler classes, with random
weights (about 8 MB on disk). Generating with it runs the real loading and
denoising path of the diffusion engine in a second, which is what the tests and
the local demo need; the pictures mean nothing. A real checkpoint directory or
hub id drops in wherever this directory is used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch

# From their modules, not the package root: mypy reads the root's names as the stand-ins
# diffusers defines for missing backends.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

log = logging.getLogger(__name__)

_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
_MAX_TOKENS = 77  # CLIP's context, which SD pipelines truncate prompts to


def build_tiny_sd(directory: Path, *, seed: int = 0) -> Path:
    """Build the tiny pipeline into ``directory`` (reused when one is already saved there).

    ``directory`` must be absent or empty. The pipeline is saved beside it and renamed into
    place, so a directory holding ``model_index.json`` is always complete, also when two
    workers build the demo at once.
    """
    if (directory / "model_index.json").is_file():
        log.info("tiny Stable Diffusion pipeline already in %s", directory)
        return directory
    log.info("building a tiny random-weight Stable Diffusion pipeline in %s ...", directory)
    started = time.perf_counter()
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial = directory.with_name(f".{directory.name}.{os.getpid()}.partial")
    with torch.random.fork_rng(devices=[]):  # seeded without moving the caller's CPU generator
        torch.manual_seed(seed)  # every module below draws its random weights from this seed
        pipe = _pipeline()
    with _no_progress_bars():
        pipe.save_pretrained(partial)
    try:
        os.replace(partial, directory)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        if not (directory / "model_index.json").is_file():
            raise  # not another builder's result: a directory with other files in it
    log.info("built the tiny pipeline in %.2f s", time.perf_counter() - started)
    return directory


def _pipeline() -> StableDiffusionPipeline:
    vocabulary = _vocabulary()
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=_text_encoder(vocabulary),
        tokenizer=_tokenizer(vocabulary),
        unet=_unet(),
        scheduler=_scheduler(),  # type: ignore[arg-type]  # hinted as the enum of scheduler names
        safety_checker=None,  # type: ignore[arg-type]  # the pipeline accepts None at run time
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )


def _byte_characters() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes (byte-level BPE's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _vocabulary() -> dict[str, int]:
    """Every byte's character, alone and word-final ("</w>"), then CLIP's two special tokens."""
    alphabet = _byte_characters()
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), _BOS, _EOS]
    return {t: i for i, t in enumerate(tokens)}


def _tokenizer(vocabulary: dict[str, int]) -> CLIPTokenizer:
    """A CLIP tokenizer with no merges: every character is a token.

    Saved with the pipeline (``tokenizer/tokenizer.json``), so loading needs no hub.
    """
    return CLIPTokenizer(
        vocab=vocabulary,
        merges=[],
        bos_token=_BOS,
        eos_token=_EOS,
        pad_token=_EOS,
        unk_token=_EOS,
        model_max_length=_MAX_TOKENS,
    )


def _text_encoder(vocabulary: dict[str, int]) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(vocabulary),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=_MAX_TOKENS,
        bos_token_id=vocabulary[_BOS],
        eos_token_id=vocabulary[_EOS],  # the pooled output is read at this token
        pad_token_id=vocabulary[_EOS],
    )
    return CLIPTextModel(config)


def _scheduler() -> EulerDiscreteScheduler:
    # Stable Diffusion 1.x's noise schedule (its scheduler_config.json): the samplers the
    # engine builds from this config then behave as they do with a real checkpoint.
    scheduler: EulerDiscreteScheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return scheduler


def _unet() -> UNet2DConditionModel:
    unet: UNet2DConditionModel = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    return unet


def _vae() -> AutoencoderKL:
    # Four blocks: the pipeline's VAE scale factor is 2 ** (blocks - 1) = 8, as in real SD,
    # so 64x64 images have 8x8 latents.
    blocks = (32, 32, 64, 64)
    vae: AutoencoderKL = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=blocks,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        layers_per_block=1,
        sample_size=64,
    )
    return vae


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers draws a tqdm bar while it writes weights; this module logs instead."""
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()
