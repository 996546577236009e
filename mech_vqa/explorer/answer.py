"""``answer_view``: one answer explained token by token, in one linked view.

    view = answer_view(vqa, inp, methods=["mechanistic", "logit_lens", "raw_attention"], curves=True)
    view.to_html("answer.html")        # click a token, a head, a method; drag the opacity
    view.save("answer_results/")       # every result it holds, as safetensors + JSON

Tokens are computed when asked (``view.compute_token(i)``); the app does so when a token is clicked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from .payload import answer_tokens, base_payload, clean_token, curve_entry, explanation_parts, lens_part, map_entry

#: heads whose position-level map is computed for every token when the model has at most this many
ALL_HEADS_MAX = 64
#: otherwise the top heads by increase (the rest on demand: ``compute_head``)
TOP_HEADS = 12


@dataclasses.dataclass
class AnswerView:
    """Results of one input, per answer token, and the page payload made from them."""

    vqa: object
    inp: object
    methods: list
    box: list | None = None
    curves: bool = False
    payload: dict = dataclasses.field(default_factory=dict)
    explanations: dict = dataclasses.field(default_factory=dict)  # token index -> Explanation
    maps: dict = dataclasses.field(default_factory=dict)  # token index -> {method: PatchMap}
    head_positions: dict = dataclasses.field(default_factory=dict)  # token index -> [HeadPositions]
    lens: object = None

    def __post_init__(self):
        if not self.payload:
            info = {"question": self.inp.question, "answer": self.inp.answer, "model": self.vqa.name}
            self.payload = base_payload("Answer", "one answer, token by token", info=info,
                                        image=self.inp.display_image(), box=self.box)
            self.payload["tokens"] = answer_tokens(self.inp.str_tokens, self.inp.answer, None) or [
                {"text": clean_token(self.inp.str_tokens[int(p)]), "position": int(p) - 1, "computed": False}
                for p in self.inp.answer_positions.tolist()]

    @property
    def n_tokens(self) -> int:
        return int(self.inp.answer_positions.numel())

    def _check_index(self, index: int) -> int:
        if not 0 <= index < self.n_tokens:
            raise IndexError(f"answer token {index} is out of range: the answer has {self.n_tokens} tokens")
        return index

    def compute_lens(self, k: int = 5):
        from ..methods.logit_lens import logit_lens

        self.lens = logit_lens(self.vqa, self.inp, k=k)
        self.payload["lens"] = lens_part(self.lens)
        return self

    def compute_token(self, index: int, methods=None, progress: Callable[[str], None] | None = None):
        """Explain answer token ``index`` with ``methods`` (default the view's); mechanistic parts always."""
        from ..compare import METHODS
        from ..methods.mechanistic import explain

        index = self._check_index(index)
        say = progress or (lambda text: None)
        target = self.inp.target(index)
        methods = list(methods or self.methods)
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
        say(f"token {target.token!r}: mechanistic attribution")
        explanation = explain(self.vqa, self.inp, target, heads="top", box=self.box, progress=False)
        self.explanations[index] = explanation
        part = explanation_parts(explanation)
        adapter = self.vqa.adapter
        if adapter.n_layers * adapter.n_heads <= ALL_HEADS_MAX:
            heads = [(layer, head) for layer in range(adapter.n_layers) for head in range(adapter.n_heads)]
        else:
            heads = explanation.heads.top_heads(TOP_HEADS)
        self._add_heads(index, part, heads, say)
        self.maps[index] = {"mechanistic": explanation.patch_map}
        part["maps"] = [map_entry(explanation.patch_map, "mechanistic")]
        self.payload["per_token"][str(index)] = part
        self.payload["tokens"][index]["computed"] = True
        for name in methods:
            if name != "mechanistic":
                self.compute_method(index, name, progress=say)
        if self.curves:
            for name in list(self.maps[index]):
                self.compute_curve(index, name, progress=say)
        return self

    def _add_heads(self, index: int, part: dict, heads, say) -> None:
        from ..methods.mechanistic import head_positions
        from .payload import head_text, rounded

        heads = [h for h in heads if f"{h[0]},{h[1]}" not in part["head_maps"]]
        if not heads:
            return
        say(f"position-level maps of {len(heads)} head(s)")
        positions = head_positions(self.vqa, self.inp, heads, self.inp.target(index))
        self.head_positions.setdefault(index, []).append(positions)
        for i, (layer, head) in enumerate(positions.heads):
            key = f"{int(layer)},{int(head)}"
            part["head_maps"][key] = rounded(positions.image_scores[i])
            part["head_text"][key] = head_text(positions, i, positions.image_positions)

    def compute_head(self, index: int, layer: int, head: int, progress=None):
        """The position-level map of one more head for token ``index`` (computing the token first if needed)."""
        index = self._check_index(index)
        if str(index) not in self.payload["per_token"]:
            self.compute_token(index, progress=progress)
        self.vqa.adapter.check_layer(layer)
        self.vqa.adapter.check_head(head)
        self._add_heads(index, self.payload["per_token"][str(index)], [(int(layer), int(head))],
                        progress or (lambda text: None))
        return self

    def compute_method(self, index: int, name: str, progress=None):
        """One more method's map for token ``index``."""
        from ..compare import METHODS

        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
        index = self._check_index(index)
        if str(index) not in self.payload["per_token"]:
            return self.compute_token(index, methods=[name], progress=progress)
        (progress or (lambda text: None))(f"token {self.inp.target(index).token!r}: {name}")
        patch_map = METHODS[name](self.vqa, self.inp, [self.inp.target(index)], self.box, {"baseline": "blur", "view": 0})
        self.maps.setdefault(index, {})[name] = patch_map
        part = self.payload["per_token"][str(index)]
        part["maps"] = [m for m in part["maps"] if m["name"] != name] + [map_entry(patch_map, name)]
        return self

    def compute_curve(self, index: int, name: str, progress=None, **options):
        """Insertion / deletion curves of method ``name``'s map for token ``index`` (blurred baseline;
        ``options`` go to :func:`~mech_vqa.metrics.insertion_deletion.insertion_deletion`, e.g. ``step_fraction``)."""
        from ..metrics.insertion_deletion import insertion_deletion

        (progress or (lambda text: None))(f"insertion / deletion of {name}")
        result = insertion_deletion(self.vqa, self.inp, self.maps[index][name], tokens=[index], progress=False,
                                    **options)
        part = self.payload["per_token"][str(index)]
        part["curves"] = [c for c in part.get("curves", []) if c["name"] != name] + [
            curve_entry(name, result.fractions, result.deletion, result.insertion, result.deletion_auc,
                        result.insertion_auc, result.flag, raw=result)]
        for entry in part["maps"]:
            if entry["name"] == name:
                entry["scores"] = {"insertion_auc": part["curves"][-1]["insertion_auc"],
                                   "deletion_auc": part["curves"][-1]["deletion_auc"]}
        return self

    # ------------------------------------------------------------------------ output
    def to_payload(self) -> dict:
        return self.payload

    def to_html(self, path=None, title: str | None = None) -> str:
        from .html import to_html

        return to_html(self.payload, path, title=title or "one answer, token by token")

    def _repr_html_(self) -> str:
        from .html import fragment

        return fragment(self.payload)

    def save(self, folder) -> list[Path]:
        """Every result held (explanations, maps, head positions, lens) as safetensors + JSON in ``folder``."""
        from ..plotting import file_stem

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for index, explanation in self.explanations.items():
            written.append(explanation.save(folder / f"token{index}_explanation"))
        for index, maps in self.maps.items():
            for name, patch_map in maps.items():
                if name != "mechanistic":  # saved inside the explanation
                    written.append(patch_map.save(folder / f"token{index}_{file_stem(name)}"))
        for index, positions in self.head_positions.items():
            for i, part in enumerate(positions):
                written.append(part.save(folder / f"token{index}_head_positions{i}"))
        if self.lens is not None:
            written.append(self.lens.save(folder / "logit_lens"))
        return written


def answer_view(vqa, inp, *, methods=("mechanistic", "logit_lens", "raw_attention"), tokens="all", box=None,
                curves: bool = False, lens: bool = True, progress: Callable[[str], None] | None = None) -> AnswerView:
    """Explain the answer tokens of ``inp`` (``"all"``, a list of indices, or None for none yet)."""
    view = AnswerView(vqa, inp, list(methods), box=box, curves=curves)
    if lens:
        view.compute_lens()
    indices = range(view.n_tokens) if tokens == "all" else (tokens or [])
    for index in indices:
        view.compute_token(int(index), progress=progress)
    if view.explanations:
        view.payload["selected"] = max(view.explanations)  # the last: the answer word, in short answers
    return view
