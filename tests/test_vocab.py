"""Token-id prompts stay inside the model's vocabulary (issue #16, item 1).

Completions prompts are random token ids. A model with a small vocabulary refused every
one of them ("Token id 29919 is out of vocabulary", vLLM with a 4096-token model). The
vocabulary is learnt from the model's folder (config.json, tokenizer.json) or given
(--infmax-vocab-size); special ids are left out; where nothing is known and the server
refuses the ids, the error says how to give the size. The simulator, given
``--vocab-size``, refuses ids as vLLM does, so the plugin is tested as users run it.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pytest_infmax.load.plan import LoadConfig
from pytest_infmax.load.scenarios import DEFAULT_TOKEN_ID_RANGE, Scenario, TokenWindow, plan_request
from pytest_infmax.load.workers import config_from_json, config_to_json
from pytest_infmax.servers import vocab

VOCAB = 4096


def write_model_folder(folder: Path, vocab_size: int = VOCAB, tokenizer_ids: int = VOCAB) -> Path:
    """A model folder as transformers saves one: config.json, tokenizer.json (WordLevel), tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama", "vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": [2, 7]})
    )
    words = {f"w{i}": i for i in range(3, tokenizer_ids - 1)}
    added = [
        {"id": i, "content": t, "special": True}
        for i, t in [(0, "<unk>"), (1, "<s>"), (2, "</s>"), (tokenizer_ids - 1, "<|pad|>")]
    ]
    added.append({"id": 1500, "content": "<|tool|>", "special": True})
    (folder / "tokenizer.json").write_text(
        json.dumps({"model": {"type": "WordLevel", "vocab": words}, "added_tokens": added})
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"added_tokens_decoder": {"2000": {"content": "<|extra|>", "special": True}}})
    )
    return folder


# -- the vocabulary, from a model folder ---------------------------------------------------


def test_a_model_folder_gives_the_size_and_the_special_ids(tmp_path: Path) -> None:
    v = vocab.from_folder(write_model_folder(tmp_path / "m"))
    assert v is not None and v.size == VOCAB
    # bos/eos (a list too) from config.json, special added tokens, tokenizer_config's decoder
    assert set(v.special_ids) == {0, 1, 2, 7, 1500, 2000, VOCAB - 1}
    assert str(tmp_path / "m") in v.source


def test_the_smaller_of_model_and_tokenizer_is_the_size(tmp_path: Path) -> None:
    # Qwen-like: the embedding has more rows than the tokenizer has ids, and the reverse
    assert vocab.from_folder(write_model_folder(tmp_path / "a", vocab_size=5000, tokenizer_ids=4096)).size == 4096
    assert vocab.from_folder(write_model_folder(tmp_path / "b", vocab_size=3000, tokenizer_ids=4096)).size == 3000


def test_a_given_size_wins_and_the_folder_still_gives_the_special_ids(tmp_path: Path) -> None:
    folder = write_model_folder(tmp_path / "m")
    v = vocab.learn(given_size=2048, given_source="given", candidates=[str(folder)])
    assert v.size == 2048 and 1500 in v.special_ids
    assert vocab.learn(given_size=2048, given_source="given", candidates=["org/absent"]).size == 2048


def test_a_hugging_face_id_is_found_in_the_local_cache(tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    write_model_folder(snapshot)
    v = vocab.learn(
        given_size=None, given_source="", candidates=["org/tiny"], env={"HF_HUB_CACHE": str(tmp_path / "hub")}
    )
    assert v.size == VOCAB and str(snapshot) in v.source
    assert vocab.learn(given_size=None, given_source="", candidates=["org/other"], env={}) is vocab.UNKNOWN


def test_a_folder_without_config_or_tokenizer_says_nothing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert vocab.from_folder(tmp_path / "empty") is None
    assert vocab.from_folder(tmp_path / "bad") is None


# -- the window the prompt ids are drawn from ------------------------------------------------


def test_an_unknown_or_large_vocabulary_keeps_the_old_window_and_the_same_prompts() -> None:
    scenario = Scenario("s", 64, 8)
    assert TokenWindow.for_vocabulary(None) == TokenWindow()
    large = TokenWindow.for_vocabulary(128256, (128000, 128001, 128009), "llama-3")
    assert (large.low, large.high, large.exclude) == (*DEFAULT_TOKEN_ID_RANGE, ())
    # the seeded prompts are those every earlier version sent: baselines stay comparable
    rng = np.random.default_rng([3, 7])
    scenario.sample_lengths(rng)
    expected = tuple(rng.integers(*DEFAULT_TOKEN_ID_RANGE, size=plan_request(scenario, 7, 3).input_len).tolist())
    assert plan_request(scenario, 7, 3).token_ids == expected
    assert plan_request(scenario, 7, 3, large).token_ids == expected


def test_a_small_vocabulary_gets_ids_inside_it_and_never_a_special_one() -> None:
    specials = (0, 1, 2, 7, 1500, 2000, VOCAB - 1)
    window = TokenWindow.for_vocabulary(VOCAB, specials, "tiny")
    assert (window.low, window.high) == (VOCAB // 8, VOCAB) and window.exclude == (1500, 2000, VOCAB - 1)
    ids = np.concatenate([window.draw(np.random.default_rng(i), 4096) for i in range(20)])
    assert ids.min() >= VOCAB // 8 and ids.max() < VOCAB
    assert not set(ids.tolist()) & set(specials)
    # every other id of the window is drawn: uniform over the allowed ids, none skipped
    assert set(ids.tolist()) == set(range(VOCAB // 8, VOCAB)) - set(specials)


def test_impossible_windows_are_refused() -> None:
    with pytest.raises(ValueError, match="leaves none"):
        TokenWindow.for_vocabulary(1)
    with pytest.raises(ValueError, match="no id left"):
        TokenWindow(5, 7, (5, 6))


def test_the_window_travels_to_worker_processes() -> None:
    config = LoadConfig(Scenario("s", 8, 4), concurrency=2, tokens=TokenWindow(10, 100, (50,), "x", True))
    assert config_from_json(json.loads(json.dumps(config_to_json(config)))) == config


# -- through the plugin, against a server that refuses ids outside its vocabulary ----------------

TEST_MODULE = """
import sys
import pytest

SIM = [sys.executable, "-m", "pytest_infmax.sim", "--port", "{port}", "--model", "{model}",
       "--vocab-size", "4096", "--decode-step-ms", "1"]

@pytest.mark.infmax_server(command=SIM, model=%r)
def test_tiny_vocab(infmax):
    infmax.run("1k1k-mini", concurrency=2, num_requests=4, warmup=0, sla=["error_rate < 1%%"])
"""


def _run(pytester: pytest.Pytester, model: str, *args: str) -> tuple[pytest.RunResult, dict | None]:
    pytester.makepyfile(test_perf=textwrap.dedent(TEST_MODULE % model))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-json", "r.json", *args)
    written = pytester.path / "r.json"
    results = json.loads(written.read_text())["results"] if written.exists() else []
    return result, results[0] if results else None


def test_ids_are_learnt_from_the_model_folder(pytester: pytest.Pytester, no_leaked_servers) -> None:
    folder = write_model_folder(pytester.path / "tiny-model")
    result, res = _run(pytester, str(folder))
    result.assert_outcomes(passed=1)
    assert res["load"]["token_ids"]["low"] == VOCAB // 8 and res["load"]["token_ids"]["high"] == VOCAB
    assert VOCAB - 1 in res["load"]["token_ids"]["excluded"]
    assert res["server"]["vocabulary"]["size"] == VOCAB
    assert "config.json vocab_size 4096" in res["server"]["vocabulary"]["source"]


def test_an_unknown_vocabulary_that_the_server_refuses_says_how_to_give_it(
    pytester: pytest.Pytester, no_leaked_servers
) -> None:
    result, res = _run(pytester, "tiny-model-without-a-folder")
    result.assert_outcomes(failed=1)
    # the test fails with the server's words, the ids sent and how to give the size
    result.stdout.fnmatch_lines(
        [
            "*TokenIdsRefused: the server refused the prompt token ids of 4 of 4 requests: "
            "HTTP 400: Token id * is out of vocabulary "
            "[[]the prompt's token ids 1000..29999 (vocabulary unknown): the model's vocabulary could not be "
            "learnt from its folder or the server; give its size: --infmax-vocab-size N (env INFMAX_VOCAB_SIZE, "
            "ini infmax_vocab_size, or vocab_size=N in @pytest.mark.infmax_server)[]]"
        ]
    )
    assert res is None  # a run of refused prompts measured nothing: no result is written


def test_the_vocab_size_setting_fixes_it(pytester: pytest.Pytester, no_leaked_servers, monkeypatch) -> None:
    monkeypatch.setenv("INFMAX_VOCAB_SIZE", "4096")
    result, res = _run(pytester, "tiny-model-without-a-folder")
    result.assert_outcomes(passed=1)
    assert res["load"]["token_ids"]["high"] == VOCAB
    assert res["server"]["vocabulary"] == {"size": VOCAB, "special_ids": 0, "source": "vocab_size 4096, as given"}


def test_the_simulator_takes_any_id_with_no_setting(pytester: pytest.Pytester, no_leaked_servers) -> None:
    pytester.makepyfile(
        test_perf="""
        def test_x(infmax):
            infmax.run("1k1k-mini", concurrency=2, num_requests=4, warmup=0, sla=["error_rate < 1%"])
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--infmax-json", "r.json")
    result.assert_outcomes(passed=1)
    (res,) = json.loads((pytester.path / "r.json").read_text())["results"]
    assert (res["load"]["token_ids"]["low"], res["load"]["token_ids"]["high"]) == DEFAULT_TOKEN_ID_RANGE
    assert "simulator" in res["server"]["vocabulary"]["source"]


def test_the_sim_refuses_ids_outside_its_vocabulary_as_vllm_does() -> None:
    from pytest_infmax.sim.requests import ApiError, completion_prompt_tokens

    assert completion_prompt_tokens([0, 4095], vocab_size=4096) == 2
    with pytest.raises(ApiError, match="Token id 4096 is out of vocabulary"):
        completion_prompt_tokens([5, 4096], vocab_size=4096)
    assert completion_prompt_tokens([29999]) == 1  # no --vocab-size: any id


def test_the_sim_checks_every_token_id_of_a_prompt() -> None:
    """The prompt's ids are checked as a whole (at C speed for plain ints): a negative id,
    a bool or a float anywhere in it is refused, in a bare list and in a one-prompt list."""
    from pytest_infmax.sim.requests import ApiError, completion_prompt_tokens

    assert completion_prompt_tokens(list(range(128))) == 128
    assert completion_prompt_tokens([[7, 8, 9]]) == 3
    for bad in ([1, -2, 3], [[4, 5, -1]], [[4, True, 5]]):
        with pytest.raises(ApiError, match="token ids must be non-negative integers"):
            completion_prompt_tokens(bad)
    for mixed in ([1, True, 3], [1, 2.0, 3]):  # neither ids nor one prompt
        with pytest.raises(ApiError, match="expected a string, a list of token ids"):
            completion_prompt_tokens(mixed)
