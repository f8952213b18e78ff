"""The unCLIP Stable Diffusion decoder: the SEED image embedding -> pixels.

`load_unclip` reads a local `StableUnCLIPImg2ImgPipeline` directory (stabilityai/
stable-diffusion-2-1-unclip layout) with `local_files_only=True`. `tiny_unclip` assembles the same
pipeline class from tiny random configs: UNet2DConditionModel with a projection class embedding for
[image embedding, noise-level embedding], AutoencoderKL, DDIM (v-prediction, as SD 2.1) and DDPM
(image noising) schedulers, and a tiny CLIP text encoder / tokenizer / vision encoder built offline.
Decoding is stochastic: the output depends on the seed of the initial latents.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _pipeline_cls():
    from diffusers import StableUnCLIPImg2ImgPipeline
    return StableUnCLIPImg2ImgPipeline


def tiny_unclip(embed_dim: int, size: int, seed: int, dtype: torch.dtype = torch.float32):
    """A random-init unCLIP pipeline that decodes to `size` x `size` (size multiple of 8)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import (CLIPImageProcessorPil, CLIPTextConfig, CLIPTextModel, CLIPTokenizer,
                              CLIPVisionConfig, CLIPVisionModelWithProjection)

    if size % 8:
        raise ValueError(f"unCLIP decode size must be a multiple of 8, got {size}")
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer(model_max_length=16)  # byte-level BPE with only its specials: offline
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=max(len(tokenizer), 8), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, projection_dim=16,
        bos_token_id=0, eos_token_id=1, pad_token_id=2))
    # Only needed by the pipeline for its dtype when image embeddings are given directly.
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=size,
        patch_size=8, projection_dim=embed_dim))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(8, 16), sample_size=size)
    unet = UNet2DConditionModel(
        sample_size=size // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=(2, 4), norm_num_groups=8,
        class_embed_type="projection", projection_class_embeddings_input_dim=2 * embed_dim)
    pipe = _pipeline_cls()(
        feature_extractor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size=size),
        image_encoder=image_encoder, image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=embed_dim),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1,
                                clip_sample=False))
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_unclip(path: str | Path, dtype: torch.dtype = torch.float32):
    p = Path(path)
    if not (p / "model_index.json").is_file():
        raise FileNotFoundError(
            f"seed_weights.unclip: {p} is not a diffusers pipeline directory (no model_index.json); "
            "point it at a local copy of stabilityai/stable-diffusion-2-1-unclip")
    from diffusers.utils import deprecation_utils

    # Newer diffusers renamed torch_dtype -> dtype (and resolve both); pass the one this version expects.
    key = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    pipe = _pipeline_cls().from_pretrained(str(p), local_files_only=True, **{key: dtype})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_compatible(pipe, embed_dim: int, src: str) -> None:
    """The quantizer's embedding must be what the pipeline's normalizer and UNet class embedding take."""
    have = pipe.image_normalizer.config.embedding_dim
    proj = pipe.unet.config.projection_class_embeddings_input_dim
    if have != embed_dim or proj != 2 * embed_dim:
        raise ValueError(f"{src}: unCLIP pipeline takes {have}-d image embeddings (UNet class input {proj}) "
                         f"but the SEED quantizer produces {embed_dim}-d embeddings")


def output_size(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


@torch.no_grad()
def decode_embedding(pipe, embeds: torch.Tensor, seed: int, steps: int, guidance_scale: float,
                     size: int) -> np.ndarray:
    """[B, D] image embeddings -> uint8 [B, size, size, 3]. A CPU generator keeps a seed's result
    independent of the device the pipeline runs on."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    dtype = pipe.unet.dtype
    out = pipe(prompt=[""] * embeds.shape[0], image_embeds=embeds.to(pipe.device, dtype), noise_level=0,
               num_inference_steps=steps, guidance_scale=guidance_scale, generator=gen, height=size, width=size,
               output_type="np").images
    return (np.clip(out, 0.0, 1.0) * 255.0).round().astype(np.uint8)
