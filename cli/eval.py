"""`guardalign eval`: flag parsing only; the work is guardalign.commands.eval.evaluate()."""
from __future__ import annotations

from typing import List, Optional

import typer

from cli._common import ANCHORS, CLIP_MODEL, DEVICE, GRID, PATCHES, PRETRAINED, QUIET, call

HELP = """Evaluate a model on published safety benchmarks under several defences, one model load, and write the paper's table.

BENCHMARKS are NAME[,KEY=VALUE...]:DIR, read in their published layouts: figstep (SafeBench CSV + typographic images), mmsafety (options images=SD|SD_TYPO|TYPO[+...], question=official|rephrased|rephrased_sd|original|changed), vlguard (subset=unsafes|safe_unsafes|safe_safes|all), spavl (Parquet; subset=harm|help), jailbreakv (CSV; subset=full|mini), hades (Parquet; step=5|all), prompts (the JSONL `answer` reads). label=NAME renames one.

Defences (--defences, any subset): vanilla; prefix; eta-detect (ETA's global CLIP check at --theta, then the prefix); ot (OT detection + purification); calibration (prefix + attention calibration); guardalign (all of them). Each item is detected once and answered once per defence.

Judges (--judge, repeatable): refusal (ETA's refusal substrings → ASR), md-judge:MODEL (ETA's MD-Judge prompt → USR), llama-guard:MODEL, llama-guard-vision:MODEL, llavaguard:MODEL (image), shieldgemma2:MODEL (image).

Writes --out DIR/records.jsonl (one record per item × defence, resumable) and DIR/summary.{json,md,html}: rates per benchmark × defence and per category with bootstrap intervals.

Examples:

  guardalign eval figstep:benchmarks/FigStep mmsafety:benchmarks/MM-SafetyBench --model llava-hf/llava-1.5-7b-hf --defences vanilla,guardalign --judge refusal --out eval/

  guardalign eval spavl:benchmarks/SPA-VL/test hades:benchmarks/HADES --model ./llava --judge refusal --judge llama-guard:meta-llama/Llama-Guard-3-8B --limit 200 --max-new-tokens 32 --out eval-small/

  guardalign eval mmsafety,images=SD,question=official:benchmarks/MM-SafetyBench --model ./llava --utility vqa.jsonl --max-new-tokens 32 --out eval-sd/ --resume

Exit codes: 0 done · 2 usage/config/model error, nothing written · 3 finished, but some items could not be answered (see their status=error records).
"""


def eval_command(
    benchmarks: Optional[List[str]] = typer.Argument(None, metavar="BENCHMARKS", help="NAME[,KEY=VALUE...]:DIR, e.g. figstep:data/FigStep."),
    model: str = typer.Option(..., "--model", "-m", help="LVLM hub id or local directory."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder: records.jsonl and summary.{json,md,html}."),
    defences: str = typer.Option("vanilla,prefix,eta-detect,ot,calibration,guardalign", "--defences", help="Comma-separated defences to run."),
    judge: Optional[List[str]] = typer.Option(None, "--judge", help="KIND[:MODEL], repeatable (default: refusal)."),
    utility: Optional[str] = typer.Option(None, "--utility", help="Utility JSONL {id, image, prompt, answer|answers}: exact-match accuracy per defence."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N items per benchmark."),
    calibration: str = typer.Option("scale", "--calibration", help="scale | paper | pai | off (calibration, guardalign)."),
    gamma: float = typer.Option(0.5, "--gamma", help="Amplification γ ≥ 0."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Calibrated decoder layers START:STOP (default: the middle half)."),
    prefix: Optional[str] = typer.Option(None, "--prefix", help="Safety prefix text (default: the anchors YAML's prefix)."),
    prefix_at: str = typer.Option("user", "--prefix-at", help="user (image, prefix, question) or response (the answer starts with it)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Tokens to generate per answer (greedy)."),
    theta: float = typer.Option(0.16, "--theta", help="eta-detect: unsafe when the image's cosine with a category ≥ θ (ETA: 0.16)."),
    anchors: Optional[str] = ANCHORS,
    clip_model: str = CLIP_MODEL,
    pretrained: str = PRETRAINED,
    patches: str = PATCHES,
    grid: Optional[int] = GRID,
    tau: Optional[float] = typer.Option(None, "--tau", help="OT threshold τ for every category (default: the anchors YAML's)."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for the intervals."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Let a judge checkpoint run its own model code (MD-Judge v0.2)."),
    device: str = DEVICE,
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), fp32, fp16, bf16."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision of --model."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out (same settings only)."),
    quiet: bool = QUIET,
) -> None:
    from guardalign.commands.eval import evaluate

    summary = call(
        evaluate,
        benchmarks=benchmarks or [], model=model, out=out, defences=defences, judge=judge or ["refusal"],
        utility=utility, limit=limit, calibration=calibration, gamma=gamma, layers=layers, prefix=prefix,
        prefix_at=prefix_at, max_new_tokens=max_new_tokens, theta=theta, anchors=anchors, clip_model=clip_model,
        pretrained=pretrained, patches=patches, grid=grid, tau=tau, bootstrap=bootstrap, seed=seed,
        trust_remote_code=trust_remote_code, device=device, dtype=dtype, revision=revision, resume=resume,
        progress=not quiet,
    )
    raise typer.Exit(summary.exit_code)


eval_command.__doc__ = HELP
