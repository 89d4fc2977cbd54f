"""`guardalign answer`: flag parsing only; the work is guardalign.commands.answer.answer()."""
from __future__ import annotations

import sys
from typing import Optional

import typer

from cli._common import call

HELP = """Answer prompts with a vision-language model behind GuardAlign's defences, one record per prompt.

Each PROMPTS line is {"id", "prompt", "image" (path relative to the JSONL file), optional "category"}; '-' reads the lines from stdin. Per prompt: detect unsafe patches, purify them (unless --no-purify), put the safety prefix in the chat (--prefix-at), generate greedily with instruction→prefix attention amplified in the middle layers, match refusal phrases, optionally ask a --judge model. Records go to --out (JSONL) with the per-layer prefix-attention curves, vanilla and calibrated.

Supported models (hub id or local directory): LLaVA-1.5, LLaVA-NeXT (llava-hf/*), Qwen2-VL, Qwen2.5-VL, Llama-3.2-Vision.

Calibration modes (--calibration): each changes the attention scores Z = QKᵀ/√d that the question and every generated token pay to the safety-prefix tokens, in the --layers only. scale (default): Z·(1+γ) where Z > 0, so only positive attention to the prefix is amplified. paper: GuardAlign's Eq. 13 as printed, Z + γ·max(0, Z)·Z, which grows with the square of Z. pai: Z + γ·|Z|, as in PAI (ECCV 2024). off: no calibration (γ and --layers are ignored). With γ = 0 every mode gives the plain model's output.

Examples:

  guardalign answer prompts.jsonl --model llava-hf/llava-1.5-7b-hf --out answers.jsonl

  guardalign answer prompts.jsonl --model ./Qwen2-VL-2B-Instruct --calibration pai --gamma 0.3 --layers 6:20 --judge ./Llama-Guard-3-1B --out answers.jsonl

  cat prompts.jsonl | guardalign answer - --model llava-hf/llava-1.5-7b-hf --prefix-at response --no-purify --out eta.jsonl

Exit codes: 0 done · 2 usage/config/model error, nothing written · 3 finished, but some prompts could not be answered (see their status=error records).
"""


def answer_command(
    prompts: str = typer.Argument(..., metavar="PROMPTS", help="Prompts JSONL file, or '-' for stdin."),
    model: str = typer.Option(..., "--model", "-m", help="LVLM hub id or local directory."),
    out: str = typer.Option(..., "--out", "-o", help="Output JSONL file ('-' for stdout)."),
    calibration: str = typer.Option("scale", "--calibration", help="scale: Z·(1+γ) where Z>0 · paper: Z + γ·max(0,Z)·Z (Eq. 13) · pai: Z + γ|Z| · off (see above)."),
    gamma: float = typer.Option(0.5, "--gamma", help="Amplification γ ≥ 0 (0 = uncalibrated)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Calibrated decoder layers START:STOP (default: the middle half)."),
    prefix: Optional[str] = typer.Option(None, "--prefix", help="Safety prefix text (default: the anchors YAML's prefix; '' for none)."),
    prefix_at: str = typer.Option("user", "--prefix-at", help="user (image, prefix, question) or response (the answer starts with it, ETA)."),
    no_purify: bool = typer.Option(False, "--no-purify", help="Detect, but give the model the original image."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Tokens to generate per prompt (greedy)."),
    judge: Optional[str] = typer.Option(None, "--judge", help="Judge model hub id or directory (e.g. Llama Guard 3) to label answers unsafe."),
    anchors: Optional[str] = typer.Option(None, "--anchors", help="Anchor YAML: categories, prefix, refusal phrases (default: shipped)."),
    clip_model: str = typer.Option("ViT-B-32", "--clip-model", help="open_clip model name, or an open_clip model-config JSON."),
    pretrained: str = typer.Option("openai", "--pretrained", help="Pretrained tag, a local checkpoint path, or 'none'."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 …"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), fp32, fp16, bf16."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit) of --model."),
    image_root: Optional[str] = typer.Option(None, "--image-root", help="Folder that relative image paths resolve against (default: the prompts file's folder; for stdin, the current directory)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run: skip ids already in --out (same settings only)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary on stderr."),
) -> None:
    from guardalign.commands.answer import answer

    summary = call(
        answer,
        prompts=prompts, model=model, out=out, calibration=calibration, gamma=gamma, layers=layers, prefix=prefix,
        prefix_at=prefix_at, purify=not no_purify, max_new_tokens=max_new_tokens, judge=judge, anchors=anchors,
        clip_model=clip_model, pretrained=pretrained, device=device, dtype=dtype, revision=revision, image_root=image_root, resume=resume,
        stdin=sys.stdin if prompts == "-" else None, progress=not quiet,
    )
    raise typer.Exit(summary.exit_code)


answer_command.__doc__ = HELP
