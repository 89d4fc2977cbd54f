"""`guardalign probe`: flag parsing only; the work is guardalign.commands.probe.probe()."""
from __future__ import annotations

import sys
from typing import Optional

import typer

from cli._common import call

HELP = """Measure, layer by layer, why a vision-language model refuses a harmful request written as text but not the same content shown as an image (the TGA diagnosis), with GuardAlign's defences on and off.

Each pair is an image and its equivalent text (a caption, or the text a typographic image shows). Per pair and per decoder layer: the logit lens at the last prompt position (rank of each refusal token; the first layer where one enters the top-k and where one is top-1) for the image form (image + --prompt) and the text form (--text-template with the text, no image); the cosine of the mean hidden state of the image tokens and of the caption fed alone; the last position's attention mass on the image / caption tokens and on the rest of the question. --defences reruns the image form with the safety prefix (prefix), prefix + attention calibration (calibration) and purify + prefix + calibration (guardalign).

PAIRS is a JSONL file of {"id", "image" (path relative to the file), "text", optional "prompt", "category"} ('-' reads stdin), or with --format figstep the FigStep folder (data/question/safebench.csv + data/images/SafeBench/; each image is paired with its instruction). Refusal tokens: --refusal-tokens, else the anchors YAML's refusal_tokens, else the first word of each refusal phrase; each is tokenised with and without a leading space and the ids used are recorded. Records go to --out (JSONL, resumable); a summary goes to stderr; `guardalign report probe.jsonl` draws the curves (HTML) or writes the numbers (--format md|json).

Examples:

  guardalign probe pairs.jsonl --model llava-hf/llava-1.5-7b-hf --out probe.jsonl

  guardalign probe FigStep/ --format figstep --model ./Qwen2-VL-2B-Instruct --defences none,prefix,calibration,guardalign --refusal-tokens Sorry,I,cannot,unable --out probe.jsonl

  guardalign probe pairs.jsonl --model ./llava-v1.6-mistral-7b-hf --lens raw --refusal-tokens Sorry,I --out tga-raw.jsonl && guardalign report tga-raw.jsonl -o tga.html

Exit codes: 0 done · 2 usage/config/model error, nothing written · 3 finished, but some pairs could not be probed (see their status=error records).
"""


def probe_command(
    pairs: str = typer.Argument(..., metavar="PAIRS", help="Pairs JSONL file ('-' for stdin), or the FigStep folder with --format figstep."),
    model: str = typer.Option(..., "--model", "-m", help="LVLM hub id or local directory."),
    out: str = typer.Option(..., "--out", "-o", help="Output JSONL file ('-' for stdout)."),
    format: str = typer.Option("jsonl", "--format", "-f", help="Input format: jsonl or figstep."),
    prompt: str = typer.Option("Describe this image.", "--prompt", help="Question of the image form (a pair's own 'prompt' wins)."),
    text_template: str = typer.Option("Describe this scene: {text}", "--text-template", help="Question of the text form; {text} is replaced by the pair's text."),
    defences: str = typer.Option("none", "--defences", help="Image-form reruns, comma-separated: none, prefix, calibration, guardalign."),
    lens: str = typer.Option("standard", "--lens", help="standard (final norm, then LM head) or raw (LM head on un-normed states, as the TGA authors' code)."),
    top_k: int = typer.Option(10, "--top-k", help="k of 'the first layer where a refusal token enters the top-k'."),
    refusal_tokens: Optional[str] = typer.Option(None, "--refusal-tokens", help="Comma-separated refusal words (default: from the anchors YAML)."),
    anchors: Optional[str] = typer.Option(None, "--anchors", help="Anchor YAML: refusal words, prefix, detector categories (default: shipped)."),
    prefix: Optional[str] = typer.Option(None, "--prefix", help="Safety prefix of the defence forms (default: the anchors YAML's)."),
    prefix_at: str = typer.Option("user", "--prefix-at", help="user (image, prefix, question) or response (the answer starts with it)."),
    calibration: str = typer.Option("scale", "--calibration", help="Calibration of the calibration/guardalign forms: scale | paper | pai | off."),
    gamma: float = typer.Option(0.5, "--gamma", help="Amplification γ ≥ 0."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Calibrated decoder layers START:STOP (default: the middle half)."),
    clip_model: str = typer.Option("ViT-B-32", "--clip-model", help="guardalign defence: open_clip model name or model-config JSON."),
    pretrained: str = typer.Option("openai", "--pretrained", help="guardalign defence: pretrained tag, checkpoint path, or 'none'."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 …"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), fp32, fp16, bf16."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit) of --model."),
    batch_size: int = typer.Option(1, "--batch-size", help="Pairs per forward pass (results do not depend on it)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run: skip ids already in --out (same settings only)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary on stderr."),
) -> None:
    from guardalign.commands.probe import probe

    summary = call(
        probe,
        pairs=pairs, model=model, out=out, format=format, prompt=prompt, text_template=text_template, defences=defences,
        lens=lens, top_k=top_k, refusal_tokens=refusal_tokens, anchors=anchors, prefix=prefix, prefix_at=prefix_at,
        calibration=calibration, gamma=gamma, layers=layers, clip_model=clip_model, pretrained=pretrained,
        device=device, dtype=dtype, revision=revision, batch_size=batch_size, resume=resume,
        stdin=sys.stdin if pairs == "-" else None, progress=not quiet,
    )
    raise typer.Exit(summary.exit_code)


probe_command.__doc__ = HELP
