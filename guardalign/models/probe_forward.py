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

from guardalign.models.lvlm import _PREFIX_SEP, ChatRequest, PromptTooLongError, _processor_call, _token_span, render_prompt

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
    weights: Any = None  # (B, S) float32 mean-pooling weights of ``pool``; None when nothing is pooled
    bias: Any = None  # (B, 1, 1, S) float32 additive padding mask of the last row; None without padding


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
                 captions: Sequence[tuple[int, int] | None] | None = None, alone: Sequence[str] = ()) -> Form:
    """Tokenise chat rows (left-padded) with their spans: image tokens, the question's tokens (less the caption),
    the caption (``captions[row]``: character span inside the question) and the prefix; pool = image tokens.

    ``alone`` appends one row per text fed alone: no chat template, the tokenizer's BOS token (when it has
    one) then the text; pool = the text's own tokens. Only with text-only requests (one processor call).
    """
    import numpy as np
    import torch

    from guardalign.attention.calibration import Positions

    rendered = [render_prompt(lvlm, r) for r in requests]
    texts = [t for t, _ in rendered]
    bos = lvlm.tokenizer.bos_token
    if alone:  # chat texts that start with BOS make the processor add no special tokens: give these theirs
        if any(r.image is not None for r in requests):
            raise ValueError("texts fed alone ride only with text-only requests")
        lead = bos if bos and all(t.startswith(bos) for t in texts) else ""
        texts += [lead + a for a in alone]
    enc = _processor_call(lvlm, texts, [r.image for r in requests] + [None] * len(alone))
    offsets = enc.pop("offset_mapping").tolist()
    repl = enc.pop("text_replacement_offsets", None) or [[] for _ in texts]
    ids, mask = enc["input_ids"], enc["attention_mask"].bool()
    rows, width = ids.shape
    lengths = [int(n) for n in mask.sum(1).tolist()]
    for row, n in enumerate(lengths):
        if lvlm.context and n > lvlm.context:
            raise PromptTooLongError(f"prompt is {n} tokens; it exceeds the model's context window of {lvlm.context}")
    image = ((ids == int(lvlm.model.config.image_token_id)) & mask).numpy()
    spans = np.zeros((rows, width, len(SPANS)), dtype=np.float32)  # numpy: cheap slice assignments
    spans[..., 0] = image
    pool = image.copy()
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
    special = set(lvlm.tokenizer.all_special_ids)
    for row in range(len(requests), rows):  # texts fed alone: the text's own tokens (not BOS, not padding)
        pool[row] = [e > s and t not in special for (s, e), t in zip(offsets[row], ids[row].tolist())]
        prefix.append((0, 0))
        starts.append(width)
    spans[..., 1] *= ~image
    real = mask.numpy()
    pool &= real
    count = pool.sum(1, keepdims=True)
    weights = (pool / np.maximum(count, 1)).astype(np.float32) if count.any() else None
    bias = None if real.all() else np.where(real, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None, None, :]
    return Form(inputs=dict(enc), spans=torch.from_numpy(spans), pool=torch.from_numpy(pool),
                positions=Positions(prefix=tuple(prefix), instr_start=tuple(starts)), lengths=lengths,
                weights=None if weights is None else torch.from_numpy(weights),
                bias=None if bias is None else torch.from_numpy(bias))


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

    Each layer's hook keeps the last position's state (B, D) and the pooled state (B, D); the logit lens of
    all layers then runs as one batch after the pass. The model's text attention must be PROBE_IMPL
    (:func:`probe_attention_on`, or ``load_lvlm(..., attn_implementation=register_probe())``).
    """
    import torch

    from guardalign.attention.calibration import calibrating
    from guardalign.attention.probe import lens_logits, pool, probing

    base, layers, norm, head = text_parts(lvlm.model)
    n, dev = len(layers), lvlm.device
    weights = None if form.weights is None else form.weights.to(dev)
    lasts: list = [None] * n  # per layer: (B, D) state at the last position, before the final norm (a copy)
    pooled: list = [None] * n  # per layer: (B, D) float32 mean over the pooled span

    def hook(layer: int):
        def reduce(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            lasts[layer] = h[:, -1].clone()  # a copy: no view may keep h (B, S, D) alive
            if weights is not None:  # transformers' last hidden state is after the final norm
                pooled[layer] = pool(norm(h) if layer == n - 1 else h, weights)
        return reduce

    inputs = {k: v.to(dev) for k, v in form.inputs.items()}
    bias = None if form.bias is None else form.bias.to(dev)
    calib = calibrating(spec, form.positions, lvlm.n_layers, audit=False) if spec is not None else nullcontext()
    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode(), probing(form.spans.to(dev), n, bias) as state, calib:
            base(**inputs, use_cache=False)
            _fill_skipped(lasts, pooled)
            logits = lens_logits(torch.stack(lasts), norm, head, lens).flatten(0, 1)  # (L·B, V)
            ranks = _ranks(logits, torch.tensor(list(token_ids), dtype=torch.long, device=dev))
    finally:
        for h in handles:
            h.remove()
    rows = form.spans.shape[0]
    nan = torch.full((rows, len(SPANS)), float("nan"), device=dev)
    return LayerResult(
        ranks=ranks.view(n, rows, -1).transpose(0, 1).to("cpu"), top1=logits.argmax(-1).view(n, rows).T.to("cpu"),
        pooled=torch.stack(pooled, 1).to("cpu") if weights is not None else None,
        mass=torch.stack([m if m is not None else nan for m in state.mass], 1).to("cpu"))


def _fill_skipped(lasts: list, pooled: list) -> None:
    """A layer that did not run (Mllama's cross-attention without an image) repeats the previous layer."""
    if lasts[0] is None or lasts[-1] is None:
        raise RuntimeError("the first and last decoder layers must run in every forward pass")
    for i in range(1, len(lasts)):
        if lasts[i] is None:
            lasts[i], pooled[i] = lasts[i - 1], pooled[i - 1]


def _ranks(logits, ids, max_elements: int = 1 << 26):
    """:func:`guardalign.attention.probe.token_ranks` in row chunks, so the (rows, n, V) comparison stays small."""
    import torch

    from guardalign.attention.probe import token_ranks

    step = max(1, max_elements // max(1, ids.numel() * logits.shape[-1]))
    if step >= logits.shape[0]:
        return token_ranks(logits, ids)
    return torch.cat([token_ranks(logits[i:i + step], ids) for i in range(0, logits.shape[0], step)])
