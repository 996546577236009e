"""``remote=True`` (NDIF) without network: a weightless client against a stand-in server.

The client is built as for NDIF (``VQAModel.from_pretrained(folder, backend="nnsight", remote=True)``:
the architecture on the meta device, no weights). nnsight's real ``RemoteBackend`` serialises each
trace; only its network exchange (``RemoteBackend.request``) is replaced by a stand-in server that
deserialises the request against a model holding the weights, runs it, and sends back what the
trace saved through ``torch.save`` / ``torch.load``, as NDIF does. The service status
(``nnsight.status``) and the hub-id lookup are stubbed; nothing here opens a socket.
"""

import io

import pytest
import torch

from conftest import QUESTION, ANSWER, write_dataset
from mech_vqa import VQAModel
from mech_vqa.backends import BackendNotSupported

pytest.importorskip("nnsight")

from nnsight.intervention.backends.remote import RemoteBackend  # noqa: E402
from nnsight.modeling import huggingface as nnsight_hf  # noqa: E402
from nnsight.schema.config import CONFIG  # noqa: E402

from mech_vqa.backends.nnsight_backend import RemoteUnavailable  # noqa: E402

TOL = dict(rtol=0, atol=1e-5)


class StandInServer:
    """Runs serialised requests against a model with weights; records the bytes of each answer."""

    def __init__(self, folder, processor):
        from nnsight.modeling.transformers import TransformersModel

        self.model = TransformersModel(str(folder), task="image-text-to-text", processor=processor,
                                       tokenizer=processor.tokenizer, dispatch=True)
        self.answers: list[int] = []
        self.model_keys: list[str] = []

    def request(self, backend, request, tracer):
        from nnsight.schema.request import RequestModel
        from nnsight.tracing.tracer import _saves, dec, inc

        blob = backend._serialize(tracer)           # what would go over the wire
        self.model_keys.append(request.model_key)
        restored = RequestModel.deserialize(blob, self.model._remoteable_persistent_objects(),
                                            compress=backend.compress)
        inc()
        try:
            restored.execute(restored.info.code)
            saves = _saves()
            result = {k: v for k, v in restored.info.frame.f_locals.items() if id(v) in saves}
        finally:
            dec()
        buffer = io.BytesIO()
        torch.save(result, buffer)
        self.answers.append(buffer.tell())
        return torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=False)


class Status:
    def __init__(self, deployments):
        self.deployments = deployments


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_vqa):
    path = tmp_path_factory.mktemp("ndif") / "tiny-llava"
    tiny_vqa.model.save_pretrained(path)
    tiny_vqa.processor.save_pretrained(path)
    return path


@pytest.fixture
def ndif(monkeypatch, folder, tiny_vqa):
    import nnsight

    server = StandInServer(folder, tiny_vqa.processor)
    monkeypatch.setattr(CONFIG.API, "APIKEY", "test-key-not-a-secret")
    monkeypatch.setattr(nnsight, "status", lambda: Status({str(folder): {"repo_id": str(folder), "state": "RUNNING"}}))
    monkeypatch.setitem(nnsight_hf._ID_CACHE, str(folder), "test-org/tiny-llava")
    monkeypatch.setattr(RemoteBackend, "request", lambda self, request, tracer: server.request(self, request, tracer))
    return server


def test_weightless_client_gets_the_hooks_results(ndif, folder, tiny_vqa, image):
    from mech_vqa.methods.logit_lens import logit_lens
    from mech_vqa.methods.mechanistic import explain, head_increase

    client = VQAModel.from_pretrained(str(folder), backend="nnsight", remote=True)
    assert {p.device.type for p in client.model.parameters()} == {"meta"}   # no weights on the client
    inp = client.prepare(image, QUESTION, ANSWER, generate=False)
    reference = tiny_vqa.prepare(image, QUESTION, ANSWER, generate=False)

    expected, got = explain(tiny_vqa, reference, heads=2, progress=False), explain(client, inp, heads=2, progress=False)
    torch.testing.assert_close(got.heads.scores, expected.heads.scores, **TOL)
    torch.testing.assert_close(got.layers.attention, expected.layers.attention, **TOL)
    torch.testing.assert_close(got.positions.scores, expected.positions.scores, **TOL)
    assert got.positions.heads == expected.positions.heads
    assert all('"repo_id": "test-org/tiny-llava"' in key for key in ndif.model_keys)

    head_increase(client, inp)
    n_layers, n_heads = client.adapter.n_layers, client.adapter.n_heads
    assert client.backend.last_saved_bytes == (3 * n_layers + n_layers * n_heads + 2) * 4
    assert ndif.answers[-1] < 4096    # the whole answer on the wire: O(layers x heads) numbers and framing

    lens, expected_lens = logit_lens(client, inp, word="red", k=3), logit_lens(tiny_vqa, reference, word="red", k=3)
    assert torch.equal(lens.top_ids, expected_lens.top_ids)
    torch.testing.assert_close(lens.word_probs, expected_lens.word_probs, **TOL)

    with client.trace(["resid_post", "z"], positions=[inp.seq_len - 1]) as cache:   # plain captures too
        out = client.forward(inp)
    with tiny_vqa.trace(["resid_post", "z"], positions=[inp.seq_len - 1]) as expected_cache:
        expected_out = tiny_vqa.forward(reference)
    torch.testing.assert_close(out.logits, expected_out.logits, **TOL)
    torch.testing.assert_close(cache["z", 1], expected_cache["z", 1], **TOL)

    from mech_vqa.methods.igos import igos
    from mech_vqa.methods.relevancy import relevancy

    with pytest.raises(RuntimeError, match="needs eager attention.*a deployment that runs eager attention"):
        relevancy(client, inp, [0], progress=False)   # the server's model runs SDPA: no probabilities to differentiate
    ndif.model._module.set_attn_implementation("eager")
    got_maps, expected_maps = relevancy(client, inp, [0, 3], progress=False), relevancy(tiny_vqa, reference, [0, 3],
                                                                                       progress=False)
    torch.testing.assert_close(got_maps.rows, expected_maps.rows, **TOL)   # the backward ran on the server
    assert ndif.answers[-1] < 4096
    small = dict(tokens=[1, 3], progress=False, mask_size=4, iterations=2, n_steps=2, l1=0.0, lr=3.0, evaluate=False,
                 seed=3)
    got_igos, expected_igos = igos(client, inp, **small), igos(tiny_vqa, reference, **small)
    assert not torch.equal(expected_igos.mask, torch.ones(4, 4))
    torch.testing.assert_close(got_igos.mask, expected_igos.mask, **TOL)   # the whole loop in one session there
    assert ndif.answers[-1] < 4096          # masks and history only


def test_clear_errors_before_any_request(monkeypatch, folder, tiny_vqa):
    import nnsight

    monkeypatch.setattr(RemoteBackend, "request", lambda *a: pytest.fail("no request may be sent"))
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    with pytest.raises(RemoteUnavailable, match="needs an API key: set the NDIF_API_KEY"):
        VQAModel.from_pretrained(str(folder), backend="nnsight", remote=True)
    monkeypatch.setattr(CONFIG.API, "APIKEY", "test-key-not-a-secret")
    monkeypatch.setattr(nnsight, "status", lambda: Status({}))     # what nnsight returns when NDIF is unreachable
    with pytest.raises(RemoteUnavailable, match="did not answer"):
        VQAModel.from_pretrained(str(folder), backend="nnsight", remote=True)
    hosted = Status({"meta-llama/Llama-3.1-8B": {"repo_id": "meta-llama/Llama-3.1-8B", "state": "RUNNING"}})
    monkeypatch.setattr(nnsight, "status", lambda: hosted)
    with pytest.raises(RemoteUnavailable, match=r"does not host .*tiny-llava.* meta-llama/Llama-3.1-8B"):
        VQAModel.from_pretrained(str(folder), backend="nnsight", remote=True)
    with pytest.raises(ValueError, match="remote must be False"):
        VQAModel(tiny_vqa.model, tiny_vqa.processor, backend="nnsight", remote="ndif")


def _three_item_run(tmp_path, folder) -> list[str]:
    """Three items written to ``tmp_path/data.jsonl`` and explained by the hooks backend into ``hooks.jsonl``;
    returns the ``mech-vqa run explain`` arguments both runs share."""
    from mech_vqa.cli import main

    write_dataset(tmp_path, 3)
    common = ["run", "explain", str(tmp_path / "data.jsonl"), "--model", str(folder), "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "hooks.jsonl"), "--device", "cpu"]) == 0
    return common


def _assert_rows_resumed_as_hooks(tmp_path) -> None:
    """``ndif.jsonl`` holds every item once, in order, ok, with ``hooks.jsonl``'s numbers to 1e-5."""
    from mech_vqa.dataset import read_results

    got, expected = read_results(tmp_path / "ndif.jsonl"), read_results(tmp_path / "hooks.jsonl")
    assert [r["id"] for r in got] == [r["id"] for r in expected]          # each row once, in order
    for row, want in zip(got, expected):
        assert row["status"] == "ok"
        for key, value in want.items():
            if key != "runtime_s" and isinstance(value, float):
                assert abs(row[key] - value) <= 1e-5, key


def test_cli_remote_ndif_rows_and_resume_after_a_network_failure(ndif, folder, tiny_vqa, tmp_path, capsys,
                                                                monkeypatch):
    """``mech-vqa run explain --backend nnsight --remote ndif`` writes the hooks backend's rows; a network
    failure in the middle stops the run cleanly and the same command resumes it, nothing lost or doubled."""


    from mech_vqa.cli import main
    from mech_vqa.dataset import read_results

    common = _three_item_run(tmp_path, folder)

    serve = StandInServer.request
    calls = {"n": 0}

    def flaky(self, backend, request, tracer):
        calls["n"] += 1
        if calls["n"] == 3:   # item 0: generate and explain; item 1 fails in its generate
            raise ConnectionError("connection reset by peer")
        return serve(self, backend, request, tracer)

    monkeypatch.setattr(RemoteBackend, "request", lambda self, request, tracer: flaky(ndif, self, request, tracer))
    remote = common + ["--out", str(tmp_path / "ndif.jsonl"), "--backend", "nnsight", "--remote", "ndif"]
    assert main(remote) == 2
    assert "connection reset by peer" in capsys.readouterr().err
    assert len(read_results(tmp_path / "ndif.jsonl")) == 1
    assert main(remote) == 0
    _assert_rows_resumed_as_hooks(tmp_path)
    assert main(common + ["--out", str(tmp_path / "x.jsonl"), "--remote", "ndif"]) == 2
    assert "add --backend nnsight" in capsys.readouterr().err


def test_cli_remote_ndif_resumes_after_a_server_side_error(ndif, folder, tiny_vqa, tmp_path, capsys, monkeypatch):
    """An error the service reports for a job (nnsight's ``RemoteError``, raised by its own handling of an
    ERROR status: a job that ran out of memory on the server, say) in the middle of an item stops the run
    cleanly, with the rows before it kept and none for that item; the same command then resumes, and every
    row is written once with the hooks backend's numbers."""

    from nnsight.schema.response import ResponseModel, Status

    from mech_vqa.cli import main
    from mech_vqa.dataset import read_results

    common = _three_item_run(tmp_path, folder)

    serve = StandInServer.request
    calls = {"n": 0}
    reported = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"

    def failing(self, backend, request, tracer):
        calls["n"] += 1
        if calls["n"] == 4:   # item 0: generate and explain; item 1: its generate ran, its explain fails there
            return backend.handle(ResponseModel(id="job-4", status=Status.ERROR, description=reported))
        return serve(self, backend, request, tracer)

    monkeypatch.setattr(RemoteBackend, "request", lambda self, request, tracer: failing(ndif, self, request, tracer))
    remote = common + ["--out", str(tmp_path / "ndif.jsonl"), "--backend", "nnsight", "--remote", "ndif"]
    assert main(remote) == 2
    err = capsys.readouterr().err
    # main's RemoteError branch (nnsight raised it from the ERROR status): one line, no traceback
    assert "the remote job failed" in err and "out of memory" in err and "run the same command again" in err
    assert "Traceback" not in err
    assert [r["id"] for r in read_results(tmp_path / "ndif.jsonl")] == [read_results(tmp_path / "hooks.jsonl")[0]["id"]]
    assert main(remote) == 0
    _assert_rows_resumed_as_hooks(tmp_path)


def test_weightless_client_runs_knockout_and_answer_rows(ndif, folder, tiny_vqa, image):
    """Knockout and the answer-row ablation from a weightless NDIF client: each batch is one whole forward on
    the server, the blocked edges and the interventions shipped with the trace."""
    from mech_vqa.methods.ablation import ablate, head_ablations
    from mech_vqa.methods.knockout import knockout

    client = VQAModel.from_pretrained(str(folder), backend="nnsight", remote=True)
    inp = client.prepare(image, QUESTION, ANSWER, generate=False)
    reference = tiny_vqa.prepare(image, QUESTION, ANSWER, generate=False)
    windows = [(0, 1), (0, tiny_vqa.adapter.n_layers)]
    expected, got = (knockout(vqa, x, windows=windows, heads=True, progress=False)
                     for vqa, x in ((tiny_vqa, reference), (client, inp)))
    assert expected.relative_change.abs().max() > 1e-4
    torch.testing.assert_close(got.knocked_logprob, expected.knocked_logprob, **TOL)
    expected, got = (ablate(vqa, x, head_ablations(tiny_vqa), progress=False, where="answer")
                     for vqa, x in ((tiny_vqa, reference), (client, inp)))
    torch.testing.assert_close(got.delta, expected.delta, **TOL)


def test_api_key_is_never_logged_or_written(ndif, folder, tmp_path, capsys, caplog):
    """The NDIF key (from nnsight's config) appears in no log record, no output, no result row or saved
    result, and in no repr of the client, through a whole remote CLI run and a saved explain result."""
    import json
    import logging

    from PIL import Image

    from mech_vqa.cli import main
    from mech_vqa.methods.mechanistic import explain

    key = CONFIG.API.APIKEY
    assert key
    caplog.set_level(logging.DEBUG)
    Image.new("RGB", (48, 40), "red").save(tmp_path / "0.png")
    row = {"image": "0.png", "question": QUESTION, "answer": ANSWER, "box": [0, 0, 24, 20]}
    (tmp_path / "data.jsonl").write_text(json.dumps(row) + "\n")
    from mech_vqa.dataset import read_results

    for task in ("explain", "knockout"):
        assert main(["run", task, str(tmp_path / "data.jsonl"), "--model", str(folder), "--no-progress", "--out",
                     str(tmp_path / f"{task}.jsonl"), "--backend", "nnsight", "--remote", "ndif"]) == 0
        assert [r["status"] for r in read_results(tmp_path / f"{task}.jsonl")] == ["ok"]
    client = VQAModel.from_pretrained(str(folder), backend="nnsight", remote=True)
    result = explain(client, client.prepare(Image.open(tmp_path / "0.png"), QUESTION, ANSWER, generate=False),
                     heads=1, progress=False)
    result.save(tmp_path / "saved")
    out = capsys.readouterr()
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.suffix == ".jsonl" and path.stem == "knockout" for path in written)
    for path in written:
        assert key.encode() not in path.read_bytes(), path
    for text in (out.out, out.err, caplog.text, repr(client), repr(client.backend)):
        assert key not in text


@pytest.mark.parametrize("family", ["gemma3", "qwen3vl"])
def test_qk_norm_family_from_a_weightless_client(family, monkeypatch, tmp_path, image, request):
    """Gemma-3 and Qwen3-VL (QK-norm; Qwen3-VL's DeepStack too) from a weightless NDIF client: the logit lens (the
    vocabulary swept on the server, after DeepStack's additions), ablations and knockout give the hooks backend's
    numbers; explain, which needs the QK-norm's weights on the client, is one clear error naming what does run
    remotely."""
    import nnsight

    from mech_vqa.methods.ablation import ablate, block_ablations
    from mech_vqa.methods.knockout import knockout
    from mech_vqa.methods.logit_lens import logit_lens
    from mech_vqa.methods.mechanistic import explain

    hooks = request.getfixturevalue(f"tiny_{family}_vqa")
    if family == "qwen3vl":
        assert hooks.adapter.deepstack_layers()
    folder = tmp_path / f"tiny-{family}"
    hooks.model.save_pretrained(folder)
    hooks.processor.save_pretrained(folder)
    server = StandInServer(folder, hooks.processor)
    monkeypatch.setattr(CONFIG.API, "APIKEY", "test-key-not-a-secret")
    monkeypatch.setattr(nnsight, "status", lambda: Status({str(folder): {"repo_id": str(folder), "state": "RUNNING"}}))
    monkeypatch.setitem(nnsight_hf._ID_CACHE, str(folder), f"test-org/tiny-{family}")
    monkeypatch.setattr(RemoteBackend, "request", lambda self, request, tracer: server.request(self, request, tracer))
    client = VQAModel.from_pretrained(str(folder), backend="nnsight", remote=True)
    assert {p.device.type for p in client.model.parameters()} == {"meta"}
    inp = client.prepare(image, QUESTION, ANSWER, generate=False)
    reference = hooks.prepare(image, QUESTION, ANSWER, generate=False)
    pairs = ((hooks, reference), (client, inp))

    expected, got = (logit_lens(vqa, x, word="red", k=3) for vqa, x in pairs)
    assert torch.equal(got.top_ids, expected.top_ids)
    torch.testing.assert_close(got.top_probs, expected.top_probs, **TOL)
    torch.testing.assert_close(got.word_probs, expected.word_probs, **TOL)
    stages, patches = got.top_ids.shape[:2]
    assert client.backend.last_saved_bytes == stages * patches * (3 * (4 + 8) + 4)   # only the maps came back
    last = hooks.adapter.n_layers - 1
    expected, got = (knockout(vqa, x, windows=[(0, 1), (0, last + 1)], progress=False) for vqa, x in pairs)
    assert expected.relative_change.abs().max() > 1e-4
    torch.testing.assert_close(got.knocked_logprob, expected.knocked_logprob, **TOL)
    for where in ("full", "answer"):
        expected, got = (ablate(vqa, x, block_ablations(hooks), progress=False, where=where) for vqa, x in pairs)
        torch.testing.assert_close(got.delta, expected.delta, **TOL)
    with pytest.raises(BackendNotSupported, match=r"normalises queries and keys \(QK-norm\).*remote='local'.*the "
                                                  r"logit lens, ablations and knockout run remotely"):
        explain(client, inp, heads=1, progress=False)
