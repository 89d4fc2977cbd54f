"""The model side of ``guardalign probe`` (DESIGN §1.3): build the forms of a pair, run one forward pass per form
with a hook on every decoder layer, and keep only per-layer reductions.

Each decoder layer's output is reduced as soon as it exists (:mod:`guardalign.attention.probe`): the logit lens at
the last position (ranks of the refusal tokens, top-1 token), the mean over the pooled span (image tokens, or
the caption's tokens), and, through the PROBE_IMPL attention function, the last position's attention mass on
the named key spans. Nothing of size layers × sequence is kept.

The hidden state of layer l is the output of decoder layer l, except that the last layer's is taken after the
model's final norm (as transformers' ``hidden_states[-1]``). The standard lens applies the final norm at every
layer; ``raw`` applies the LM head to the un-normed states (the authors' released code). The base model
(without LM head) runs the forward, so no logits over every position are computed.

Mllama skips its cross-attention layers when there is no image: their outputs equal their inputs, so a
skipped layer repeats the previous layer's values; they have no self-attention (attention mass NaN).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from guardalign.models.lvlm import (
    _PREFIX_SEP, ChatRequest, PromptTooLongError, _processor_call, _token_span, render_prompt,
)

if TYPE_CHECKING:  # pragma: no cover
    from guardalign.attention.calibration import CalibrationSpec, Positions
    from guardalign.models.lvlm import LVLM

SPANS = ("image", "text", "caption", "prefix")  # key spans whose attention mass is recorded, in this order


@dataclass(frozen=True)
class RefusalToken:
    word: str  # the refusal word as configured ("Sorry")
    text: str  # the string tokenised: the word, or the word after a space (" Sorry")
    id: int  # its first token id: what the lens ranks
    token: str  # that token decoded

    def to_record(self) -> dict:
        return {"word": self.word, "text": self.text, "id": self.id, "token": self.token}


def refusal_tokens(tokenizer, words: Sequence[str]) -> list[RefusalToken]:
    """The first token of each word, tokenised with and without a leading space; a variant whose first token is
    blank (a bare space piece) is skipped and each id is kept once. Raises ValueError when none remains."""
    out: list[RefusalToken] = []
    seen: set[int] = set()
    for word in words:
        for text in (word, " " + word):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids or ids[0] in seen:
                continue
            piece = tokenizer.decode([ids[0]])
            if not piece.strip():
                continue
            seen.add(ids[0])
            out.append(RefusalToken(word=word, text=text, id=int(ids[0]), token=piece))
    if not out:
        raise ValueError(f"no refusal token could be formed from {list(words)!r} with this tokenizer")
    return out


@dataclass
class Form:
    """One forward pass worth of rows, on the CPU until :func:`run_form`."""

    inputs: dict  # model inputs (left-padded), CPU tensors
    spans: Any  # (B, S, len(SPANS)) float: key positions of each named span per row
    pool: Any  # (B, S) bool: positions to mean-pool (image tokens / caption tokens), or None
    positions: "Positions | None"  # calibration positions (prefix R, instruction start t0) of chat rows
    lengths: list[int]  # unpadded length of each row, in tokens


def text_parts(model) -> tuple[Any, Any, Any, Any]:
    """(base model, decoder layers, final norm, LM head) of a supported LVLM."""
    lm = model.model.language_model
    return model.model, lm.layers, lm.norm, model.lm_head


def _question_start(text: str, req: ChatRequest, span: tuple[int, int]) -> int:
    """Character offset of ``req.question`` in the rendered prompt ``text`` (``span``: the prefix's)."""
    if req.prefix_at == "user":
        q0 = span[1] + (len(_PREFIX_SEP) if req.prefix.strip() else 0)
    else:
        q0 = text.rfind(req.question, 0, span[0])
    if q0 < 0 or text[q0:q0 + len(req.question)] != req.question:
        raise RuntimeError("the chat template did not render the question verbatim")
    return q0


def prepare_chat(lvlm: "LVLM", requests: Sequence[ChatRequest],
                 captions: Sequence[tuple[int, int] | None] | None = None) -> Form:
    """Tokenise chat rows (left-padded) with their spans: image tokens, the question's tokens (less the caption),
    the caption (``captions[row]``: character span inside the question) and the prefix; pool = image tokens."""
    import torch

    from guardalign.attention.calibration import Positions

    rendered = [render_prompt(lvlm, r) for r in requests]
    enc = _processor_call(lvlm, [t for t, _ in rendered], [r.image for r in requests])
    offsets = enc.pop("offset_mapping").tolist()
    repl = enc.pop("text_replacement_offsets", None) or [[] for _ in rendered]
    ids, mask = enc["input_ids"], enc["attention_mask"].bool()
    rows, width = ids.shape
    lengths = [int(n) for n in mask.sum(1).tolist()]
    for row, n in enumerate(lengths):
        if lvlm.context and n > lvlm.context:
            raise PromptTooLongError(f"prompt is {n} tokens; it exceeds the model's context window of {lvlm.context}")
    spans = torch.zeros(rows, width, len(SPANS))
    prefix, starts = [], []
    for row, ((text, span), req) in enumerate(zip(rendered, requests)):
        r0, r1 = _token_span(offsets[row], span, repl[row])
        prefix.append((r0, r1))
        starts.append(r1 if req.prefix_at == "user" else width)
        q0 = _question_start(text, req, span)
        t0, t1 = _token_span(offsets[row], (q0, q0 + len(req.question)), repl[row])
        spans[row, t0:t1, 1] = 1
        cap = captions[row] if captions is not None else None
        if cap is not None:
            c0, c1 = _token_span(offsets[row], (q0 + cap[0], q0 + cap[1]), repl[row])
            spans[row, c0:c1, 1], spans[row, c0:c1, 2] = 0, 1
        if req.prefix.strip():  # an empty prefix may still map to the token that straddles its place
            spans[row, r0:r1, 3] = 1
    image = (ids == int(lvlm.model.config.image_token_id)) & mask
    spans[..., 0] = image.float()
    spans[..., 1] *= (~image).float()
    return Form(inputs=dict(enc), spans=spans, pool=image,
                positions=Positions(prefix=tuple(prefix), instr_start=tuple(starts)), lengths=lengths)


def _left_pad(t, width: int, value):
    import torch

    if t.shape[1] == width:
        return t
    return torch.cat([t.new_full((t.shape[0], width - t.shape[1], *t.shape[2:]), value), t], dim=1)


def add_captions(lvlm: "LVLM", form: Form, captions: Sequence[str]) -> Form:
    """Append one row per caption, fed alone (the tokenizer's own special tokens, no chat template), to a
    text-only ``form``; pool = each caption's own tokens. The chat rows keep their spans and pool nothing."""
    import torch

    if "pixel_values" in form.inputs:
        raise ValueError("add_captions needs a text-only form")
    enc = lvlm.tokenizer(list(captions), padding=True, return_tensors="pt", return_offsets_mapping=True)
    offs, cmask = enc["offset_mapping"], enc["attention_mask"].bool()
    cpool = (offs[..., 1] > offs[..., 0]) & cmask
    width = max(form.inputs["input_ids"].shape[1], enc["input_ids"].shape[1])
    pad_id = lvlm.tokenizer.pad_token_id
    inputs = {}
    for key, value in form.inputs.items():
        fill = pad_id if key == "input_ids" else 0
        extra = enc[key] if key in ("input_ids", "attention_mask") else torch.zeros_like(enc["input_ids"]).to(value.dtype)
        inputs[key] = torch.cat([_left_pad(value, width, fill), _left_pad(extra.to(value.dtype), width, fill)])
    spans = torch.cat([_left_pad(form.spans, width, 0), torch.zeros(len(captions), width, len(SPANS))])
    pool = torch.cat([torch.zeros(form.spans.shape[0], width, dtype=torch.bool), _left_pad(cpool, width, False)])
    lengths = form.lengths + [int(n) for n in cmask.sum(1).tolist()]
    return Form(inputs=inputs, spans=spans, pool=pool, positions=None, lengths=lengths)


@dataclass
class LayerResult:
    """Per-layer reductions of one forward pass: O(layers) per row."""

    ranks: Any  # (B, L, n) long: 1-based rank of each refusal token under the lens
    top1: Any  # (B, L) long: the lens's top-1 token id
    pooled: Any  # (B, L, D) float32: mean hidden state over the pooled span, or None
    mass: Any  # (B, L, len(SPANS)) float32: last position's attention mass per span, NaN without self-attention


@contextmanager
def probe_attention_on(lvlm: "LVLM") -> Iterator[None]:
    """Run the language model with PROBE_IMPL attention inside this block (switched back afterwards)."""
    from guardalign.attention.probe import PROBE_IMPL, register_probe

    text_cfg = lvlm.model.config.get_text_config()
    before = text_cfg._attn_implementation
    if before == PROBE_IMPL:
        yield
        return
    lvlm.model.set_attn_implementation({"text_config": register_probe()})
    try:
        yield
    finally:
        lvlm.model.set_attn_implementation({"text_config": before})


def run_form(lvlm: "LVLM", form: Form, token_ids: Sequence[int], *, lens: str = "standard",
             spec: "CalibrationSpec | None" = None) -> LayerResult:
    """One forward pass of ``form`` (calibrated by ``spec`` when given) with per-layer reductions.

    The model's text attention must be PROBE_IMPL (:func:`probe_attention_on`, or ``load_lvlm(...,
    attn_implementation=register_probe())``).
    """
    import torch

    from guardalign.attention.calibration import calibrating
    from guardalign.attention.probe import lens_logits, pool, probing, span_weights, token_ranks

    base, layers, norm, head = text_parts(lvlm.model)
    n = len(layers)
    dev = lvlm.device
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=dev)
    weights = span_weights(form.pool).to(dev) if form.pool is not None and bool(form.pool.any()) else None
    ranks: list = [None] * n
    top1: list = [None] * n
    pooled: list = [None] * n

    def hook(layer: int):
        def reduce(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            logits = lens_logits(h[:, -1], norm, head, last_layer=layer == n - 1, lens=lens)
            ranks[layer], top1[layer] = token_ranks(logits, ids), logits.argmax(-1)
            if weights is not None:
                pooled[layer] = pool(norm(h) if layer == n - 1 else h, weights)
        return reduce

    inputs = {k: v.to(dev) for k, v in form.inputs.items()}
    calib = calibrating(spec, form.positions, lvlm.n_layers, audit=False) if spec is not None else nullcontext()
    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode(), probing(form.spans.to(dev), n) as state, calib:
            base(**inputs, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return _stack(ranks, top1, pooled, state.mass, form.spans.shape[0], dev)


def _stack(ranks, top1, pooled, mass, rows: int, device) -> LayerResult:
    """Stack per-layer results (a layer that did not run repeats the previous one) and move them to the CPU."""
    import torch

    if ranks[0] is None or ranks[-1] is None:
        raise RuntimeError("the first and last decoder layers must run in every forward pass")
    for i in range(1, len(ranks)):
        if ranks[i] is None:
            ranks[i], top1[i], pooled[i] = ranks[i - 1], top1[i - 1], pooled[i - 1]
    nan = torch.full((rows, len(SPANS)), float("nan"), device=device)
    return LayerResult(
        ranks=torch.stack(ranks, 1).cpu(), top1=torch.stack(top1, 1).cpu(),
        pooled=torch.stack(pooled, 1).cpu() if pooled[0] is not None else None,
        mass=torch.stack([m if m is not None else nan for m in mass], 1).cpu())
