"""Cheap previews of a diffusion in progress, straight from the latents (no VAE).

A linear map from Stable Diffusion's 4 latent channels to RGB, fitted by the
community and used by AUTOMATIC1111 as its "Approx cheap" live preview. The
preview has the latents' resolution (an eighth of the image's side), which is
all a progress bar needs and costs next to nothing to send.
"""

from __future__ import annotations

import torch
from PIL import Image

from workers.engines.image_codec import png_base64

# rows: latent channels 0..3, columns: R, G, B (A1111's sd_vae_approx.cheap_approximation)
_LATENT_TO_RGB = torch.tensor(
    [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ]
)


def latent_preview(latents: torch.Tensor) -> str | None:
    """A base64 PNG of the first image of a (batch, 4, h, w) latent batch; None for other shapes."""
    if latents.ndim != 4 or latents.shape[1] != _LATENT_TO_RGB.shape[0]:
        return None  # the fit is for 4-channel SD latents; others would preview as nonsense
    rgb = torch.einsum("chw,cr->hwr", latents[0].detach().float().cpu(), _LATENT_TO_RGB)
    pixels = ((rgb + 1.0) / 2.0).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return png_base64(Image.fromarray(pixels.numpy()))
