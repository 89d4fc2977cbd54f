"""Judges for ``guardalign eval``: ``--judge KIND[:MODEL]``, several allowed.

===================  =========================================================  ===========  =========
KIND                 what it judges, how                                        MODEL        target
===================  =========================================================  ===========  =========
refusal              ETA / VLGuard refusal-substring rule → ASR                 none         response
md-judge             MD-Judge with ETA's exact prompt → USR                      ID | DIR     response
llama-guard          Llama Guard 3 1B/8B (text): safe | unsafe + S-codes         ID | DIR     response
llama-guard-vision   Llama Guard 3 11B Vision / Llama Guard 4, with the image   ID | DIR     response
llavaguard           LlavaGuard: JSON rating, category, rationale of the image  ID | DIR     image
shieldgemma2         ShieldGemma 2: P(Yes) per policy of the image              ID | DIR     image
===================  =========================================================  ===========  =========

Every judge has ``kind``, ``name``, ``target``, ``needs_image`` and
``judge(prompt, response, image=None) -> guardalign.models.judge.Judgement``.
"""
from __future__ import annotations

from dataclasses import dataclass

from guardalign.errors import ConfigError

KINDS = ("refusal", "md-judge", "llama-guard", "llama-guard-vision", "llavaguard", "shieldgemma2")
_NEEDS_MODEL = frozenset(KINDS) - {"refusal"}


@dataclass(frozen=True)
class JudgeSpec:
    kind: str  # one of KINDS
    model: str | None  # hub id or local directory (None for refusal)

    @property
    def label(self) -> str:
        """Column name in records and tables: the kind, plus the model for model judges."""
        return self.kind if self.model is None else f"{self.kind}:{self.model}"


def parse_judge_spec(text: str) -> JudgeSpec:
    """``KIND`` or ``KIND:MODEL``; ConfigError (exit 2) naming the kinds for anything else."""
    kind, sep, model = str(text).strip().partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise ConfigError(f"unknown judge {text!r}: expected one of {', '.join(KINDS)} "
                          "(model judges as KIND:MODEL, e.g. llama-guard:meta-llama/Llama-Guard-3-8B)")
    model = model.strip() or None
    if kind in _NEEDS_MODEL and model is None:
        raise ConfigError(f"judge {kind!r} needs a model: --judge {kind}:ID_OR_DIR")
    if kind not in _NEEDS_MODEL and model is not None:
        raise ConfigError(f"judge {kind!r} takes no model (got {model!r})")
    return JudgeSpec(kind, model)


def parse_judge_specs(texts) -> list[JudgeSpec]:
    """Parse several ``--judge`` values; ConfigError when one is given twice."""
    specs = [parse_judge_spec(t) for t in texts]
    labels = [s.label for s in specs]
    dup = next((l for l in labels if labels.count(l) > 1), None)
    if dup:
        raise ConfigError(f"judge {dup!r} is given twice")
    return specs


def load_judge(spec: JudgeSpec, *, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False):
    """Load one judge (ModelLoadError, exit 2, when the model cannot be loaded)."""
    if spec.kind == "refusal":
        from guardalign.models.judges.refusal import RefusalSubstringJudge

        return RefusalSubstringJudge()
    if spec.kind == "md-judge":
        from guardalign.models.judges.mdjudge import MDJudge

        return MDJudge.load(spec.model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    if spec.kind == "llama-guard":
        from guardalign.models.judges.base import load_causal_lm
        from guardalign.models.judges.llamaguard import LlamaGuardJudge

        net, tok = load_causal_lm(spec.model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        return LlamaGuardJudge(net, tok, spec.model)
    if spec.kind == "llama-guard-vision":
        from guardalign.models.judges.llamaguard import VisionGuardJudge

        return VisionGuardJudge.load(spec.model, device=device, dtype=dtype)
    if spec.kind == "llavaguard":
        from guardalign.models.judges.llavaguard import LlavaGuardJudge

        return LlavaGuardJudge.load(spec.model, device=device, dtype=dtype)
    from guardalign.models.judges.shieldgemma import ShieldGemma2Judge

    return ShieldGemma2Judge.load(spec.model, device=device, dtype=dtype)
