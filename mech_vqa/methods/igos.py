"""iGOS+ / iGOS++ saliency for open-ended LVLM answers.

Xing et al. 2025, "Where do Large Vision-Language Models Look at when Answering Questions?"
(arXiv 2503.13891), built on iGOS++ (Khorram et al., KDD 2021). A mask ``m`` ``[h, w]`` in
[0, 1] (1 = keep the image, init all ones) is optimised so that deleting the salient cells
destroys the answer and inserting them restores it.

Notation: ``I``, ``B`` image and baseline pixel values ``[1, *pixel_shape]`` (the processor's
normalised space; see :mod:`mech_vqa.methods.scoring` for the baselines), ``U(m)`` bilinear
upsampling (``align_corners=False``) of the mask to the pixel grid ``[H, W]`` (the mask covers
the first view's image; a LLaVA-NeXT tile samples it over the box of that image it shows,
:func:`~mech_vqa.adapters.base.mask_to_pixels`), ``Phi(X, Y, u) = X * u + Y * (1 - u)``, and the
score of the visually relevant tokens ``S`` (:mod:`mech_vqa.methods.token_selection`), teacher-forced, float32::

    s(X) = sum_{t in S} log p(y_t | X)

iGOS+ (one mask, the paper's default), iteration ``i = 0 .. iterations-1``, ``k = 1 .. N``,
``eps ~ N(0, noise_std^2)`` drawn afresh for every point::

    D    = mean_k s(Phi(I, B, (k/N) U(m)) + eps_k)         deletion (minimised)
    Ins  = mean_k s(Phi(B, I, (k/N) U(m)) + eps'_k)        insertion (maximised)
    R    = L1 mean(1 - m) + L3 BTV(m) + L2 exp(-gamma i) sum((1 - m)^2)
    g    = d(D - Ins + R)/dm
    theta_i = m - lr g ;  m <- clip(theta_i + i/(i + momentum) (theta_i - theta_{i-1}), 0, 1)   (Nesterov)

    BTV(m) = 1/2 [ mean(dm_y^2) + mean(dm_x^2)
                   + mean(w_y dU(m)_y^2) + mean(w_x dU(m)_x^2) ],  w = exp(-(mean_c dI)^2 / sigma)

with ``dI`` the neighbour differences of ``I`` (first view) averaged over channels and
``sigma = 0.01``, as in the authors' code. Saliency = ``1 - m``. (The authors write the L1 term
as ``mean(|1 - m|)``, equal on [0, 1] but with a zero gradient at the initial ``m = 1``; we
differentiate ``mean(1 - m)`` as the formula says.)

iGOS++ (``two_masks=True``): a deletion mask ``m_d`` and an insertion mask ``m_i``; the gradient is
half the sum of four integrated terms, ``D(m_d m_i) - Ins(m_d m_i) + D(m_d) - Ins(m_i)`` (products
of the upsampled masks), plus ``R(m_d m_i)``; the mask is ``m = m_d m_i``.

Engineering (what differs from the authors' code, not the maths): all ``2N`` (iGOS++: ``4N``)
interpolation points of an iteration go through the model as one batch, split into chunks of
``chunk_size`` rows, each chunk's graph freed by its own backward; logits are computed only at the
predicting rows of ``S`` (:class:`~mech_vqa.methods.scoring.AnswerScorer`); no KV cache; the
model's parameters are frozen for the run (:func:`~mech_vqa.hooks.preserved_state`) so that the
gradient reaches only the mask. ``reference=True`` runs the same optimisation the authors' way
(one forward per point at batch size 1, full-vocabulary logits at every position): it exists
for the benchmark and the equivalence test only.

The optimisation itself is :class:`~mech_vqa.methods.igos_core.MaskOptimiser` (torch-only): on the nnsight
backend the whole loop runs in one nnsight session next to the model (in process or remote), and only
the masks and the history come back (:meth:`~mech_vqa.backends.nnsight_backend.NNsightBackend.igos_masks`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..adapters.base import mask_to_pixels
from ..hooks import preserved_state
from ..inputs import PreparedInput, check_box, check_pixels
from ..metrics.insertion_deletion import from_raw, insertion_deletion_curves, mean_probability
from ..results.igos import IGOSResult
from .igos_core import MaskOptimiser, bilateral_tv, edge_weights, regulariser, upsample  # noqa: F401
from .scoring import AnswerScorer, input_baseline
from .token_selection import TokenSelection, check_tau, resolve_selection


@dataclasses.dataclass(frozen=True)
class IGOSConfig:
    """Hyperparameters; the defaults are the authors' README command (iGOS+, 5 iterations)."""

    mask_size: int | tuple[int, int] = 32   #: square on a non-square image: n along the shorter side
    iterations: int = 5
    n_steps: int = 10            #: N, interpolation points per integral
    l1: float = 1.0
    l2: float = 0.1
    l3: float = 10.0
    gamma: float = 1.0
    momentum: float = 5.0        #: Nesterov ``i / (i + momentum)``; 0 disables momentum
    lr: float = 10.0
    noise_std: float = 0.2
    bilateral_sigma: float = 0.01
    two_masks: bool = False      #: iGOS++ (separate deletion and insertion masks)
    chunk_size: int = 20         #: most rows per forward/backward (20 = all 2N points of iGOS+ at once;
                                 #: lower it to fit a 7B model's activations in GPU memory)

    def __post_init__(self):
        size = (self.mask_size, self.mask_size) if isinstance(self.mask_size, int) else tuple(self.mask_size)
        if len(size) != 2 or any(not isinstance(s, int) or s < 1 for s in size):
            raise ValueError(f"mask_size must be an int >= 1 or a pair (rows, cols) of them, got {self.mask_size!r}")
        object.__setattr__(self, "mask_size", size)
        for name in ("iterations", "n_steps", "chunk_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("l1", "l2", "l3", "gamma", "momentum", "noise_std"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("lr", "bilateral_sigma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "mask_size": list(self.mask_size)}


# --------------------------------------------------------------------------- optimiser
def optimise_mask(score_fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, baseline: torch.Tensor,
                  config: IGOSConfig | None = None, *, seed: int = 0, progress: bool = True,
                  one_point_per_forward: bool = False, geometry=None) -> dict:
    """Optimise the iGOS+/iGOS++ mask(s) for a black-box ``score_fn: pixels [n, ...] -> s [n]``.

    ``score_fn`` must be differentiable in the pixels (``s = sum_{t in S} log p``). With
    ``one_point_per_forward`` every interpolation point is scored and back-propagated on its own
    (the reference way; same noise, same result up to float rounding). ``geometry`` (an
    :class:`~mech_vqa.adapters.ImageGeometry`) lays the mask over every view of a tiled image;
    without it the mask is upsampled onto the pixel grid of every view alike. The arithmetic is
    :class:`~mech_vqa.methods.igos_core.MaskOptimiser` (the same code a remote nnsight session runs).

    Returns a dict: ``mask`` ``[h, w]``, ``masks`` (one per optimised mask), ``history``.
    """
    config = config or IGOSConfig()
    to_pixels = geometry.mask_to_pixels if geometry is not None else mask_to_pixels
    optimiser = MaskOptimiser(image, baseline, config, seed, to_pixels, one_point_per_forward)
    bar = tqdm(range(config.iterations), desc="iGOS++" if config.two_masks else "iGOS+", disable=not progress)
    for iteration in bar:
        optimiser.start_iteration()
        for chunk in optimiser.chunks:
            optimiser.backward(chunk, score_fn(optimiser.composite(chunk)))
        per_term = list(optimiser.step(iteration).values())
        bar.set_postfix(deletion=f"{per_term[0]:.3f}", insertion=f"{per_term[1]:.3f}")
    return optimiser.result()


# ------------------------------------------------------------------------------ method
def _check_answer(vqa, inp: PreparedInput) -> None:
    if not isinstance(inp, PreparedInput):
        raise TypeError("igos takes a PreparedInput (VQAModel.prepare(image, question, answer)), "
                        f"got {type(inp).__name__}")
    if inp.answer_positions.numel() == 0:
        raise ValueError("this input has no answer tokens to explain; prepare it with an answer "
                         "(VQAModel.prepare(image, question, answer)) or let the model generate one")
    unk = vqa.tokenizer.unk_token_id
    ids = inp.input_ids[0, inp.answer_positions].tolist()
    if unk is not None and unk in ids:
        raise ValueError(f"the answer {inp.answer!r} does not tokenize: the tokenizer maps part of it to its "
                         f"unknown token {vqa.tokenizer.unk_token!r}; use words from the model's vocabulary")


def igos(vqa, inp: PreparedInput, *, tokens: TokenSelection | Sequence[int] | None = None, tau: float = 1.0,
         baseline: str | torch.Tensor = "blur", config: IGOSConfig | None = None, seed: int = 0,
         progress: bool = True, evaluate: bool = True, step_fraction: float = 0.02, box=None,
         reference: bool = False, **overrides) -> IGOSResult:
    """Explain the answer of ``inp`` with iGOS+ (default) or iGOS++ (``two_masks=True``).

    Args:
        vqa: the :class:`~mech_vqa.model.VQAModel` (left exactly as found).
        inp: prepared input with the answer teacher-forced (``vqa.prepare(image, question)``
            generates it greedily).
        tokens: ``S`` by hand (answer-token indices or a ``TokenSelection``); default: the
            visually relevant tokens against the baseline with threshold ``tau``.
        tau: selection threshold in nats (>= 0).
        baseline: ``"blur"`` (default), ``"black"``, ``"noise"`` or baseline pixel values.
        config: an :class:`IGOSConfig`; ``overrides`` replace single fields (``mask_size=8``...).
        seed: seeds the noise; the same seed gives the same mask.
        evaluate: also compute the saliency's deletion/insertion curves.
        step_fraction: curve step (share of cells).
        box: ground-truth box to store with the result (for plots and localisation scores).
        reference: run the slow reference way (benchmark and tests only).

    Returns: an :class:`~mech_vqa.results.igos.IGOSResult`; with an empty ``S`` nothing is
    optimised and ``result.empty`` / ``result.message`` say so.
    """
    known = {f.name for f in dataclasses.fields(IGOSConfig)}
    if set(overrides) - known:
        raise TypeError(f"igos got unknown options {sorted(set(overrides) - known)}; IGOSConfig fields are "
                        f"{sorted(known)}")
    config = dataclasses.replace(config or IGOSConfig(), **overrides)
    tau = check_tau(tau)
    _check_answer(vqa, inp)
    if not 0 < step_fraction <= 1:
        raise ValueError(f"step_fraction must be in (0, 1], got {step_fraction}")
    if box is not None:
        box = check_box(box, inp.geometry.image_size)
    check_pixels(inp.pixel_values)  # perturbed pixels never pass through model_inputs' check
    height, width = (int(v) for v in inp.geometry.image_size)
    rows, cols = config.mask_size
    if rows == cols and height != width:
        # a square mask_size on a non-square image (Qwen-VL's dynamic resolution): n cells along the shorter
        # side and the image's proportions along the longer, so cells stay square (as insertion/deletion wants)
        short, long_side = sorted((height, width))
        n_long = max(1, round(rows * long_side / short))
        config = dataclasses.replace(config, mask_size=(rows, n_long) if height < width else (n_long, rows))
    if config.mask_size[0] > height or config.mask_size[1] > width:  # cells below one pixel change nothing more
        raise ValueError(f"mask_size {tuple(config.mask_size)} is finer than the {height} x {width} pixels of the "
                         f"image the model saw; use at most {height} x {width} (the model's patch grid is "
                         f"{inp.geometry.grid[0]} x {inp.geometry.grid[1]}; the default is 32)")
    timings, start = {}, time.perf_counter()
    base = input_baseline(vqa, inp, baseline).to(vqa.device)
    image = inp.pixel_values.float().to(vqa.device)
    params = {**config.to_dict(), "tau": tau, "seed": seed, "reference": reference,
              "baseline": baseline if isinstance(baseline, str) else "tensor"}
    common = dict(image=torch.as_tensor(inp.display_image()), image_size=list(inp.geometry.image_size),
                  box=[float(v) for v in box] if box is not None else None, params=params, info=inp.info())

    with preserved_state(vqa.model, frozen=True):
        vqa.model.eval()
        selection = resolve_selection(vqa, inp, tokens, base, tau=tau, gaps_for_manual=True)
        timings["selection"] = time.perf_counter() - start
        targets = [inp.target(i).to_dict() for i in selection.indices]
        if selection.empty:
            ones = torch.ones(config.mask_size)
            timings["total"] = time.perf_counter() - start
            return IGOSResult(saliency=torch.zeros(config.mask_size), mask=ones, tokens=selection.records(),
                              targets=[], timings=timings, message=selection.message, **common)

        scorer = AnswerScorer(vqa, inp, selection.indices)
        log_probs = scorer.reference if reference else scorer
        t0 = time.perf_counter()
        session = getattr(vqa.backend, "igos_masks", None)
        # a backend that runs the whole loop next to the model (nnsight: one session, only masks come back)
        optimised = None if reference or session is None else session(scorer, image, base, config, seed=seed,
                                                                      geometry=inp.geometry)
        if optimised is None and getattr(vqa.backend, "remote", False):
            from ..backends import BackendNotSupported

            raise BackendNotSupported(
                f"igos through a remote trace is not supported for {type(vqa.model).__name__}: the optimisation runs "
                "in an nnsight session next to the model, which needs the mask-to-pixel map as per-view bilinear "
                "factors (and, for flattened patches, an index), and this layout's map or batched inputs are not of "
                "that form; run it in process (remote=False) or on the hooks backend")
        if optimised is None:
            optimised = optimise_mask(lambda pixels: log_probs(pixels).sum(-1), image, base, config, seed=seed,
                                      progress=progress, one_point_per_forward=reference, geometry=inp.geometry)
        timings["optimisation"] = time.perf_counter() - t0
        mask = optimised["mask"].cpu()
        saliency = 1 - mask
        curves = {}
        if evaluate:
            t0 = time.perf_counter()
            with torch.no_grad():
                raw = insertion_deletion_curves(mean_probability(log_probs, range(scorer.n_tokens)), image, base,
                                                saliency, step_fraction=step_fraction,
                                                chunk_size=1 if reference else config.chunk_size, progress=progress,
                                                geometry=inp.geometry)
            metric = from_raw(raw)
            curves = dict(fractions=metric.fractions, deletion_curve=metric.deletion,
                          insertion_curve=metric.insertion, deletion_auc=metric.deletion_auc,
                          insertion_auc=metric.insertion_auc)
            timings["metric"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
    two = config.two_masks
    return IGOSResult(saliency=saliency, mask=mask,
                      mask_deletion=optimised["masks"][0].cpu() if two else None,
                      mask_insertion=optimised["masks"][1].cpu() if two else None,
                      tokens=selection.records(), targets=targets, history=optimised["history"], timings=timings,
                      message=selection.message, **curves, **common)
