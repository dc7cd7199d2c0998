"""The node classes the simulator knows: a small, realistic slice of ComfyUI's core nodes.

Data only (the declarations are in ``nodedefs.py``); ``catalogue`` picks the classes one run serves.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from orchestrator.simulator.nodedefs import ANY, Files, Input, NodeDef

SAMPLERS = (
    "euler",
    "euler_cfg_pp",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "heun",
    "heunpp2",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "gradient_estimation",
    "er_sde",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
)
SCHEDULERS = (
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
)
SEED_MAX = 0xFFFFFFFFFFFFFFFF


def _int(name: str, default: int, lo: int, hi: int, step: int = 1, **extra: Any) -> Input:
    return Input(name, "INT", {"default": default, "min": lo, "max": hi, "step": step, **extra})


def _float(name: str, default: float, lo: float, hi: float, step: float = 0.01, **extra: Any) -> Input:
    return Input(name, "FLOAT", {"default": default, "min": lo, "max": hi, "step": step, **extra})


_HIDDEN_SAVE = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
_UPSCALE = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")

CORE_NODES: tuple[NodeDef, ...] = (
    NodeDef(
        "CheckpointLoaderSimple",
        "Load Checkpoint",
        "loaders",
        "Loads a diffusion model checkpoint, diffusion models are used to denoise latents.",
        required=(
            Input(
                "ckpt_name", Files("checkpoints"), {"tooltip": "The name of the checkpoint (model) to load."}
            ),
        ),
        outputs=("MODEL", "CLIP", "VAE"),
    ),
    NodeDef(
        "CLIPTextEncode",
        "CLIP Text Encode (Prompt)",
        "conditioning",
        "Encodes a text prompt using a CLIP model into an embedding.",
        required=(
            Input("text", "STRING", {"multiline": True, "dynamicPrompts": True}),
            Input("clip", "CLIP"),
        ),
        outputs=("CONDITIONING",),
    ),
    NodeDef(
        "CLIPSetLastLayer",
        "CLIP Set Last Layer",
        "conditioning",
        required=(Input("clip", "CLIP"), _int("stop_at_clip_layer", -1, -24, -1)),
        outputs=("CLIP",),
    ),
    NodeDef(
        "EmptyLatentImage",
        "Empty Latent Image",
        "latent",
        "Create a new batch of empty latent images to be denoised via sampling.",
        required=(
            _int("width", 512, 16, 16384, 8),
            _int("height", 512, 16, 16384, 8),
            _int("batch_size", 1, 1, 4096),
        ),
        outputs=("LATENT",),
    ),
    NodeDef(
        "KSampler",
        "KSampler",
        "sampling",
        "Uses the provided model, positive and negative conditioning to denoise the latent image.",
        required=(
            Input("model", "MODEL"),
            _int("seed", 0, 0, SEED_MAX, control_after_generate=True),
            _int("steps", 20, 1, 10000),
            _float("cfg", 8.0, 0.0, 100.0, 0.1, round=0.01),
            Input("sampler_name", SAMPLERS),
            Input("scheduler", SCHEDULERS),
            Input("positive", "CONDITIONING"),
            Input("negative", "CONDITIONING"),
            Input("latent_image", "LATENT"),
            _float("denoise", 1.0, 0.0, 1.0),
        ),
        outputs=("LATENT",),
    ),
    NodeDef(
        "VAEDecode",
        "VAE Decode",
        "latent",
        "Decodes latent images back into pixel space images.",
        required=(Input("samples", "LATENT"), Input("vae", "VAE")),
        outputs=("IMAGE",),
    ),
    NodeDef(
        "VAEEncode",
        "VAE Encode",
        "latent",
        required=(Input("pixels", "IMAGE"), Input("vae", "VAE")),
        outputs=("LATENT",),
    ),
    NodeDef(
        "VAELoader",
        "Load VAE",
        "loaders",
        required=(Input("vae_name", Files("vae")),),
        outputs=("VAE",),
    ),
    NodeDef(
        "LoraLoader",
        "Load LoRA",
        "loaders",
        "LoRAs are used to modify diffusion and CLIP models, altering the way in which latents are denoised.",
        required=(
            Input("model", "MODEL"),
            Input("clip", "CLIP"),
            Input("lora_name", Files("loras")),
            _float("strength_model", 1.0, -100.0, 100.0),
            _float("strength_clip", 1.0, -100.0, 100.0),
        ),
        outputs=("MODEL", "CLIP"),
    ),
    NodeDef(
        "LatentUpscale",
        "Upscale Latent",
        "latent",
        required=(
            Input("samples", "LATENT"),
            Input("upscale_method", _UPSCALE),
            _int("width", 512, 0, 16384, 8),
            _int("height", 512, 0, 16384, 8),
            Input("crop", ("disabled", "center")),
        ),
        outputs=("LATENT",),
    ),
    NodeDef(
        "ImageScale",
        "Upscale Image",
        "image/upscaling",
        required=(
            Input("image", "IMAGE"),
            Input("upscale_method", ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")),
            _int("width", 512, 0, 16384),
            _int("height", 512, 0, 16384),
            Input("crop", ("disabled", "center")),
        ),
        outputs=("IMAGE",),
    ),
    NodeDef(
        "ImageScaleBy",
        "Upscale Image By",
        "image/upscaling",
        required=(
            Input("image", "IMAGE"),
            Input("upscale_method", ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")),
            _float("scale_by", 1.0, 0.01, 8.0),
        ),
        outputs=("IMAGE",),
    ),
    NodeDef(
        "EmptyImage",
        "EmptyImage",
        "image",
        required=(
            _int("width", 512, 1, 16384),
            _int("height", 512, 1, 16384),
            Input("batch_size", "INT", {"default": 1, "min": 1, "max": 4096}),
            _int("color", 0, 0, 0xFFFFFF, display="color"),
        ),
        outputs=("IMAGE",),
    ),
    NodeDef("ImageInvert", "Invert Image", "image", required=(Input("image", "IMAGE"),), outputs=("IMAGE",)),
    NodeDef(
        "ImageBatch",
        "Batch Images",
        "image",
        required=(Input("image1", "IMAGE"), Input("image2", "IMAGE")),
        outputs=("IMAGE",),
    ),
    NodeDef(
        "ImageBlur",
        "ImageBlur",
        "image/postprocessing",
        required=(Input("image", "IMAGE"), _int("blur_radius", 1, 1, 31), _float("sigma", 1.0, 0.1, 10.0, 0.1)),
        outputs=("IMAGE",),
        python_module="comfy_extras.nodes_post_processing",
    ),
    NodeDef(
        "ImageSharpen",
        "ImageSharpen",
        "image/postprocessing",
        required=(
            Input("image", "IMAGE"),
            _int("sharpen_radius", 1, 1, 31),
            _float("sigma", 1.0, 0.1, 10.0),
            _float("alpha", 1.0, 0.0, 5.0),
        ),
        outputs=("IMAGE",),
        python_module="comfy_extras.nodes_post_processing",
    ),
    NodeDef(
        "UpscaleModelLoader",
        "Load Upscale Model",
        "loaders",
        required=(Input("model_name", Files("upscale_models")),),
        outputs=("UPSCALE_MODEL",),
        python_module="comfy_extras.nodes_upscale_model",
    ),
    NodeDef(
        "ImageUpscaleWithModel",
        "Upscale Image (using Model)",
        "image/upscaling",
        required=(Input("upscale_model", "UPSCALE_MODEL"), Input("image", "IMAGE")),
        outputs=("IMAGE",),
        python_module="comfy_extras.nodes_upscale_model",
    ),
    NodeDef(
        "ControlNetLoader",
        "Load ControlNet Model",
        "loaders",
        required=(Input("control_net_name", Files("controlnet")),),
        outputs=("CONTROL_NET",),
    ),
    NodeDef(
        "ControlNetApplyAdvanced",
        "Apply ControlNet",
        "conditioning/controlnet",
        required=(
            Input("positive", "CONDITIONING"),
            Input("negative", "CONDITIONING"),
            Input("control_net", "CONTROL_NET"),
            Input("image", "IMAGE"),
            _float("strength", 1.0, 0.0, 10.0),
            _float("start_percent", 0.0, 0.0, 1.0, 0.001),
            _float("end_percent", 1.0, 0.0, 1.0, 0.001),
        ),
        optional=(Input("vae", "VAE"),),
        outputs=("CONDITIONING", "CONDITIONING"),
        output_names=("positive", "negative"),
    ),
    NodeDef(
        "LoadImage",
        "Load Image",
        "image",
        required=(Input("image", Files("input"), {"image_upload": True}),),
        outputs=("IMAGE", "MASK"),
    ),
    NodeDef(
        "SaveImage",
        "Save Image",
        "image",
        "Saves the input images to your ComfyUI output directory.",
        required=(
            Input("images", "IMAGE", {"tooltip": "The images to save."}),
            Input("filename_prefix", "STRING", {"default": "ComfyUI"}),
        ),
        hidden=_HIDDEN_SAVE,
        output_node=True,
    ),
    NodeDef(
        "PreviewImage",
        "Preview Image",
        "image",
        "Saves the input images to your ComfyUI output directory.",  # sic: inherited from SaveImage
        required=(Input("images", "IMAGE"),),
        hidden=_HIDDEN_SAVE,
        output_node=True,
    ),
    NodeDef(
        "SimulatedError",
        "Simulated Error",
        "simulator",
        "Always fails when executed (the simulator's stand-in for a node that raises).",
        optional=(Input("input", ANY), Input("message", "STRING", {"default": "simulated failure"})),
        output_node=True,
        python_module="simulator",
    ),
)


def extra_node(spec: str) -> NodeDef:
    """A stand-in custom node class; ``Name:output`` makes it an output node."""
    name, _, kind = spec.partition(":")
    return NodeDef(
        name.strip(),
        name.strip(),
        "simulated",
        "Simulated custom node (SIM_EXTRA_NODES).",
        optional=(Input("input", ANY), Input("value", "STRING", {"default": ""})),
        outputs=() if kind.strip() == "output" else (ANY,),
        output_node=kind.strip() == "output",
        python_module="custom_nodes.simulated",
    )


def catalogue(extra: Iterable[str] = ()) -> dict[str, NodeDef]:
    """Core classes plus the named extra classes, by class name."""
    defs = {d.name: d for d in CORE_NODES}
    for spec in extra:
        if spec.strip():
            node = extra_node(spec)
            defs.setdefault(node.name, node)
    return defs
