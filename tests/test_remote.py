"""Remote execution (NDIF): the checks before any work, and the stages' traces run as a server
would run them (serialised, deserialised without this package installed, only saved values
sent back), against the same stages run here."""

import http.server
import json
import socket
import threading

import numpy as np
import pytest
import torch

from rephelpers.abilities.evaluation import evaluate_abilities
from rephelpers.abilities.forward import greedy_generate
from rephelpers.abilities.suite import build_tasks
from rephelpers.errors import RephelpersError
from rephelpers.interventions.intervene import Intervention, forward_readout, sequence_nll
from rephelpers.interventions.edits import Ablate, Noise, Project
from rephelpers.representations.activations import extract_activations
from rephelpers.representations.models import load_model, model_fingerprint
from rephelpers.representations.remote import check_ndif

from remote_support import server_like

TEXTS = ["The capital of France is Paris, a city on the Seine.", "def add(a, b):\n    return a + b",
         "Licensed under the Apache License, Version 2.0.", "Seven plus five is twelve."]
EDITS = [Intervention(Ablate(tuple(range(0, 576, 9))), 5),
         Intervention(Noise(tuple(range(40)), sigma=2.0, seed=3), 9),
         Intervention(Project(tuple(tuple(float(x) for x in row) for row in np.eye(576)[:2])), 12)]


@pytest.fixture
def no_key(monkeypatch):
    from nnsight import CONFIG

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any attempt to read a model's files fails the test: the checks must come first."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model file was read before the remote checks")

    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_ndif(monkeypatch):
    """A local stand-in for NDIF's /status and /whoami, serving one running model."""
    answers = {"/status": {"deployments": {"a": {"repo_id": "org/served", "application_state": "RUNNING"},
                                           "b": {"repo_id": "org/starting", "application_state": "DEPLOYING"}}},
               "/whoami": {"email": "someone@example.org", "tags": []}}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(answers.get(self.path, {})).encode()
            self.send_response(200 if self.path in answers else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("NDIF_HOST", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    yield answers
    server.shutdown()


def test_a_missing_api_key_is_refused_before_anything_is_read(no_key, nothing_loads):
    with pytest.raises(RephelpersError, match="NDIF_API_KEY"):
        load_model("meta-llama/Llama-3.1-8B", remote=True)


def test_an_unreachable_service_is_refused_before_anything_is_read(monkeypatch, nothing_loads):
    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    monkeypatch.setenv("NDIF_HOST", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    with pytest.raises(RephelpersError, match="did not answer.*network"):
        load_model("meta-llama/Llama-3.1-8B", remote=True)


def test_a_model_the_service_does_not_run_is_refused_with_what_it_runs(fake_ndif, nothing_loads):
    with pytest.raises(RephelpersError, match=r"not running 'org/starting'.*org/served"):
        load_model("org/starting", remote=True)
    check_ndif("org/served")  # served and running: no complaint


def test_an_unrecognised_key_is_a_warning(fake_ndif):
    fake_ndif["/whoami"] = {"email": None, "tags": []}
    with pytest.warns(UserWarning, match="does not recognise the API key"):
        check_ndif("org/served")


def test_bad_remote_options_are_refused(nothing_loads):
    with pytest.raises(RephelpersError, match="remote='yes'"):
        load_model("smollm2-135m", remote="yes")
    with pytest.raises(RephelpersError, match="leave device"):
        load_model("meta-llama/Llama-3.1-8B", remote=True, device="cpu")


@pytest.fixture(scope="module")
def simulated(model):
    """The embedded model with every trace sent through the remote path (``remote="local"``)."""
    remote = load_model("smollm2-135m", remote="local")
    assert remote is not model and remote.remote == "local"
    assert model_fingerprint(remote) == model_fingerprint(model)  # the same weights, the same numbers
    return remote


@pytest.mark.model
def test_stage_02_activations_equal_a_local_run(model, simulated, monkeypatch):
    local = extract_activations(model, TEXTS, [3, 15], use_cache=False, progress=False, batch_size=2)
    with server_like(monkeypatch):
        remote = extract_activations(simulated, TEXTS, [3, 15], use_cache=False, progress=False, batch_size=2)
    for layer in (3, 15):
        np.testing.assert_array_equal(remote[layer], local[layer])


@pytest.mark.model
def test_stage_04_perturbed_likelihoods_and_readouts_equal_a_local_run(model, simulated, monkeypatch):
    nll, count = sequence_nll(model, TEXTS, EDITS, batch_size=2, progress=False)
    batch = model.encode(TEXTS[:2])
    readout = forward_readout(model, batch, EDITS, read_layers=[9, 20])
    with server_like(monkeypatch):
        remote_nll, remote_count = sequence_nll(simulated, TEXTS, EDITS, batch_size=2, progress=False)
        remote_readout = forward_readout(simulated, batch, EDITS, read_layers=[9, 20])
        plain_nll, _ = sequence_nll(simulated, TEXTS, [], batch_size=2, progress=False)
    np.testing.assert_array_equal(remote_count, count)
    np.testing.assert_allclose(remote_nll, nll, rtol=0, atol=1e-4)
    assert np.abs(plain_nll - nll).max() > 1.0  # the edits reach the remote forward pass
    torch.testing.assert_close(remote_readout.nll, readout.nll, rtol=0, atol=1e-4)
    for layer in (9, 20):
        torch.testing.assert_close(remote_readout.pooled[layer], readout.pooled[layer], rtol=0, atol=1e-5)
    with pytest.raises(RephelpersError, match="attention patterns cannot be read"):
        forward_readout(simulated, batch, EDITS, attention_layers=[20])


@pytest.mark.model
def test_stage_05_scores_equal_a_local_run_and_generation_is_refused(model, simulated, monkeypatch, tmp_path):
    tasks = build_tasks(["icl", "reasoning"], tmp_path, items_per_task=3, seed=0)
    mc = {"icl": tasks["icl"]}
    configs = {"baseline": [], "ablate": [Intervention(Ablate(tuple(range(0, 576, 2))), 12)]}
    local = evaluate_abilities(model, mc, configs, batch_size=2, progress=False)
    with server_like(monkeypatch):
        # fast=True falls back to one request per lm-eval batch: nothing is shared between requests
        remote = evaluate_abilities(simulated, mc, configs, batch_size=2, progress=False, fast=True)
    key = ["config_id", "task", "item"]
    local, remote = local.sort_values(key).reset_index(drop=True), remote.sort_values(key).reset_index(drop=True)
    assert (remote.score.to_numpy() == local.score.to_numpy()).all()
    np.testing.assert_allclose(remote.margin, local.margin, rtol=0, atol=1e-4)
    assert local.groupby("config_id").margin.mean().nunique() == 2
    with pytest.raises(RephelpersError, match="reasoning"):
        evaluate_abilities(simulated, tasks, configs, batch_size=2, progress=False)
    batch = simulated.encode(["Hello"])
    with pytest.raises(RephelpersError, match="runs remotely"):
        greedy_generate(simulated, batch["input_ids"], batch["attention_mask"])


@pytest.mark.model
def test_a_block_that_ships_code_the_server_lacks_fails_in_the_simulation(simulated, monkeypatch):
    """The simulation can fail: without this package shipped by value, the server cannot
    rebuild the interventions."""
    import cloudpickle.cloudpickle as cp

    monkeypatch.setattr(cp, "_PICKLE_BY_VALUE_MODULES", set(cp._PICKLE_BY_VALUE_MODULES) - {"rephelpers"})
    with server_like(monkeypatch), pytest.raises(ModuleNotFoundError, match="rephelpers"):
        sequence_nll(simulated, TEXTS[:1], EDITS[:1], progress=False)
