"""The fault campaign's subset in `make test`: every stage killed at a few random instants and at its fault points,
its disk filled, its inputs corrupted; bench/faults.py runs the same jobs with dozens of trials."""

from __future__ import annotations

import random

import fault_jobs as jobs
import pytest
from fault_core import mount_refusal

pytestmark = pytest.mark.slow
TRIALS = 2
SLOW = {"kill_convert": 1, "kill_pipeline": 1}  # each trial a whole conversion or chain: one random instant


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_model_dir) -> jobs.Chain:
    return jobs.Chain(tmp_path_factory.mktemp("chain"), tiny_model_dir)


@pytest.fixture
def rng(request) -> random.Random:
    return random.Random(request.node.name)  # a fixed draw per test: a failure reruns the same instants


@pytest.mark.parametrize("job", ["kill_dataset", "kill_bake", "kill_convert", "kill_ollama_import"])
def test_killed_stage_leaves_previous_or_new_artifact(job, chain, tmp_path, rng):
    getattr(jobs, job)(chain, tmp_path, SLOW.get(job, TRIALS), rng).assert_clean()


def test_killed_pipeline_resumes_to_the_uninterrupted_artifacts(tmp_path, rng):
    jobs.kill_pipeline(tmp_path, SLOW["kill_pipeline"], rng).assert_clean()


@pytest.mark.parametrize("job", ["fill_dataset", "fill_bake", "fill_convert", "fill_train"])
def test_full_disk_is_a_clear_error_and_keeps_the_previous_artifact(job, chain, tmp_path, rng):
    if why := mount_refusal():
        pytest.skip(why)
    getattr(jobs, job)(chain, tmp_path, 1, rng).assert_clean()


@pytest.mark.parametrize("job", ["corrupt_checkpoint", "corrupt_baked_shard"])
def test_corrupt_input_is_refused_naming_the_file(job, chain, tmp_path, rng):
    getattr(jobs, job)(chain, tmp_path, TRIALS, rng).assert_clean()


def test_corrupt_gguf_is_refused_by_every_reader(chain, tmp_path, rng):
    from test_ollama import StandInOllama

    server = StandInOllama()
    server.start()
    try:
        jobs.corrupt_gguf(chain, tmp_path, 1, rng, server).assert_clean()
    finally:
        server.stop()
