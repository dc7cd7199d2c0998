"""Command-line flags of the ComfyUI simulator: a subset of ComfyUI v0.3.64's ``comfy/cli_args.py``.

This file is copied verbatim into simulated code trees as ``comfy/cli_args.py``. The
orchestrator reads that copy as text (``add_argument("--flag"``) to learn which flags the
checked-out release supports, exactly as it does with real ComfyUI, so every flag is declared
with a literal ``parser.add_argument("--flag", ...)`` call. Standard library only, and nothing
is parsed at import time.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

PREVIEW_METHODS = ("none", "auto", "latent2rgb", "taesd")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def is_valid_directory(path: str) -> str:
    """argparse type: an existing, readable directory (as ComfyUI checks --user-directory)."""
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"The path '{path}' does not exist.")
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"'{path}' is not a directory.")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"You do not have read permissions for '{path}'.")
    return path


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The parser, flag for flag as ComfyUI declares them (types, defaults, groups)."""
    # One call per flag with the flag on the add_argument line, as in ComfyUI's own file, so
    # any text scan for `add_argument("--flag"` finds every flag.
    # fmt: off
    parser = argparse.ArgumentParser(prog=prog)

    parser.add_argument("--listen", type=str, default="127.0.0.1", metavar="IP", nargs="?",
                        const="0.0.0.0,::", help="IP address(es) to listen on, comma separated.")
    parser.add_argument("--port", type=int, default=8188, help="Set the listen port.")
    parser.add_argument("--enable-cors-header", type=str, default=None, metavar="ORIGIN", nargs="?",
                        const="*", help="Enable CORS (Cross-Origin Resource Sharing) with optional origin.")
    parser.add_argument("--max-upload-size", type=float, default=100,
                        help="Set the maximum upload size in MB.")

    parser.add_argument("--base-directory", type=str, default=None,
                        help="Base directory for models, custom_nodes, input, output, temp, and user.")
    parser.add_argument("--extra-model-paths-config", type=str, default=None, metavar="PATH", nargs="+",
                        action="append", help="Load one or more extra_model_paths.yaml files.")
    parser.add_argument("--output-directory", type=str, default=None,
                        help="Set the ComfyUI output directory. Overrides --base-directory.")
    parser.add_argument("--temp-directory", type=str, default=None,
                        help="Set the ComfyUI temp directory (default is in the ComfyUI directory).")
    parser.add_argument("--input-directory", type=str, default=None,
                        help="Set the ComfyUI input directory. Overrides --base-directory.")
    parser.add_argument("--auto-launch", action="store_true",
                        help="Automatically launch ComfyUI in the default browser.")
    parser.add_argument("--disable-auto-launch", action="store_true",
                        help="Disable auto launching the browser.")
    parser.add_argument("--cuda-device", type=int, default=None, metavar="DEVICE_ID",
                        help="Set the id of the cuda device this instance will use.")

    parser.add_argument("--preview-method", type=str, default="none", choices=PREVIEW_METHODS,
                        help="Default preview method for sampler nodes.")

    vram_group = parser.add_mutually_exclusive_group()
    vram_group.add_argument("--gpu-only", action="store_true", help="Store and run everything on the GPU.")
    vram_group.add_argument("--highvram", action="store_true", help="Keep models in GPU memory after use.")
    vram_group.add_argument("--normalvram", action="store_true", help="Force normal vram use.")
    vram_group.add_argument("--lowvram", action="store_true", help="Split the unet to use less vram.")
    vram_group.add_argument("--novram", action="store_true", help="When lowvram isn't enough.")
    vram_group.add_argument("--cpu", action="store_true", help="To use the CPU for everything (slow).")

    parser.add_argument("--disable-smart-memory", action="store_true",
                        help="Force ComfyUI to agressively offload to regular ram.")
    parser.add_argument("--dont-print-server", action="store_true", help="Don't print server output.")
    parser.add_argument("--quick-test-for-ci", action="store_true", help="Quick test for CI.")
    parser.add_argument("--disable-metadata", action="store_true",
                        help="Disable saving prompt metadata in files.")
    parser.add_argument("--disable-all-custom-nodes", action="store_true",
                        help="Disable loading all custom nodes.")
    parser.add_argument("--whitelist-custom-nodes", type=str, nargs="+", default=[],
                        help="Custom node folders to load even when --disable-all-custom-nodes is set.")
    parser.add_argument("--disable-api-nodes", action="store_true", help="Disable loading all api nodes.")
    parser.add_argument("--multi-user", action="store_true", help="Enables per-user storage.")
    parser.add_argument("--verbose", default="INFO", const="DEBUG", nargs="?", choices=LOG_LEVELS,
                        help="Set the logging level")
    parser.add_argument("--log-stdout", action="store_true",
                        help="Send normal process output to stdout instead of stderr (default).")

    parser.add_argument("--user-directory", type=is_valid_directory, default=None,
                        help="Set the ComfyUI user directory with an absolute path.")
    parser.add_argument("--database-url", type=str, default=None,
                        help="Specify the database URL, e.g. 'sqlite:///:memory:'.")
    # fmt: on
    return parser


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default: ``sys.argv[1:]``); bad flags exit 2 as argparse does."""
    return build_parser(prog).parse_args(None if argv is None else list(argv))
