"""Visual tokens in vocabulary space: the logit lens at the image positions.

nostalgebraist 2020 ("interpreting GPT: the logit lens"), applied to LLaVA's visual tokens as in
Yu & Ananiadou 2024 (arXiv 2411.10950) and Neo et al. 2024 ("Towards Interpreting Visual Information
Processing in Vision-Language Models"). For each image position ``p`` and stage ``s`` -- the
projector output (= input of layer 0) and the output of every decoder layer (plus, for Qwen3-VL,
the DeepStack features the text model adds after the first layers) -- the residual
``r_sp`` ``[d]`` is read through the final norm, applied per position (NOT frozen, unlike the
attribution scorer), and the unembedding::

    probs_sp = softmax(W_U norm(r_sp) (+ b_U))          [vocab], float32

Kept: the top-``k`` tokens and their probabilities ``[stages, n_patches, k]`` and, for a chosen
``word``, its probability ``[stages, n_patches]`` -- a patch heatmap per layer. At the last layer
this is exactly the model's own next-token distribution at the image positions.
"""

from __future__ import annotations

import torch

from ..inputs import PreparedInput
from ..results.mechanistic import LogitLens
from .logprob import CHUNK_ELEMENTS, check_token_ids, normalise, vocab_sweep


def word_token_id(vqa, word: str | int) -> int:
    """The single token id of ``word`` (or ``word`` itself when an int), or one clear error."""
    if isinstance(word, int):
        return int(check_token_ids(vqa.adapter, [word])[0])
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"word must be a non-empty string or a token id, got {word!r}")
    tokenizer = vqa.tokenizer
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"word {word!r} is {len(ids)} tokens {tokenizer.convert_ids_to_tokens(ids)}; "
                         "pass a single-token word or its token id")
    if ids[0] == tokenizer.unk_token_id and word != tokenizer.unk_token:
        raise ValueError(f"word {word!r} is not in the vocabulary (it maps to {tokenizer.unk_token!r})")
    return int(ids[0])


@torch.no_grad()
def logit_lens(vqa, inp: PreparedInput, word: str | int | None = None, *, k: int = 5,
               chunk_elements: int = CHUNK_ELEMENTS, progress: bool = False, view: int = 0) -> LogitLens:
    """Top-``k`` tokens of every image patch at every stage, and ``word``'s probability map.

    One forward records the residual stream at the image positions only (the input of layer 0 and
    every layer's output); one chunked sweep of the unembedding reads all of them. ``view``: whose
    image tokens (0 = the whole-image view; 1 = LLaVA-NeXT's high-resolution tiles).
    """
    if not isinstance(inp, PreparedInput):
        raise TypeError(f"logit_lens takes one PreparedInput (vqa.prepare), got {type(inp).__name__}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    adapter = vqa.adapter
    word_id = word_token_id(vqa, word) if word is not None else None
    geometry = inp.geometry
    chosen = geometry.view == view  # one map per image view
    if not chosen.any():
        raise ValueError(f"no image token belongs to view {view} (views: {sorted(set(geometry.view.tolist()))})")
    positions = geometry.positions[chosen]
    deepstack = set(adapter.deepstack_layers())
    if getattr(vqa.backend, "lens_near_model", False):
        # the vocabulary sweep runs where the activations are (inside the nnsight trace / on NDIF)
        swept = vqa.backend.logit_lens_scores(
            adapter.model_inputs(inp.model_inputs(vqa.device, adapter.vision_dtype())), positions=positions,
            k=min(k, adapter.vocab_size), word_id=word_id, chunk_elements=chunk_elements)
        top_ids, top_probs, word_probs = swept["top_ids"], swept["top_probs"], swept["word_probs"]
    else:
        # the input of layer 0 (the projector's output at the image positions) and every layer's output
        names = ["resid_pre", "resid_post"] + (["deepstack"] if deepstack else [])
        layers = {"resid_pre": [0], **({"deepstack": sorted(deepstack)} if deepstack else {})}
        with vqa.trace(names, positions=positions, layers=layers) as cache:
            vqa.forward(inp, logits_to_keep=1)
        # after layer l the residual is the layer's output plus what DeepStack adds there (Qwen3-VL), which is
        # what layer l + 1 reads
        stages = [cache["resid_pre", 0][0]] + [
            cache["resid_post", layer][0] + (cache["deepstack", layer][0] if layer in deepstack else 0)
            for layer in range(adapter.n_layers)]
        resid = torch.stack(stages)  # [L + 1, n_patches, d]
        n_stages, n_patches, _ = resid.shape
        sweep = vocab_sweep(adapter, normalise(adapter, resid).flatten(0, 1), k=min(k, adapter.vocab_size),
                            token_ids=None if word_id is None else [word_id], chunk_elements=chunk_elements,
                            progress=progress)
        lse = sweep["lse"].unsqueeze(1)
        top_probs = (sweep["top_logits"] - lse).exp().view(n_stages, n_patches, -1)
        top_ids = sweep["top_ids"].view(n_stages, n_patches, -1)
        word_probs = None if word_id is None else (sweep["logits"] - lse).exp().view(n_stages, n_patches)
    top_tokens = [[vqa.to_str_tokens(ids) for ids in stage] for stage in top_ids.cpu()]
    return LogitLens(
        top_ids=top_ids.cpu(), top_probs=top_probs.cpu(), rowcol=geometry.rowcol[chosen].clone(),
        view=view, boxes=geometry.boxes[chosen].clone(),
        word_probs=None if word_probs is None else word_probs.cpu(), top_tokens=top_tokens,
        word=None if word is None else (word if isinstance(word, str) else vqa.to_str_tokens([word_id])[0]),
        word_id=word_id, grid=list(geometry.grid), image_size=list(geometry.image_size),
        image=torch.from_numpy(inp.display_image()), model=vqa.name, prompt=inp.prompt,
        info={"question": inp.question, "answer": inp.answer, "positions": positions.tolist()},
    )
