"""An endpoint's health and limit (`endpoints.Endpoint`) and the token estimate (`workload.WorkEstimate`): pure rules."""

from __future__ import annotations

import pytest

from batchgen.client import Client
from batchgen.endpoints import DECREASE_GAP_S, Endpoint, EndpointSpec, EndpointState
from batchgen.errors import (
    APIConnectionError,
    APITimeoutError,
    BadRequestError,
    ConfigError,
    IncompleteResponseError,
    NotFoundError,
    RateLimitError,
    ServerError,
)
from batchgen.workload import WorkEstimate, usage_tokens


def _endpoint(capacity: int = 8, eject_after: int = 3) -> Endpoint:
    return Endpoint(Client("http://h:1/v1"), capacity, eject_after=eject_after)


REFUSED = APIConnectionError("refused")


def test_n_connection_failures_in_a_row_eject_and_anything_answered_in_between_resets_the_streak() -> None:
    endpoint = _endpoint()
    assert not endpoint.failed(REFUSED, 0.0) and not endpoint.failed(ServerError(500, "x"), 0.0)
    endpoint.succeeded()
    assert not endpoint.failed(APITimeoutError("slow"), 0.0) and not endpoint.failed(REFUSED, 0.0)
    assert not endpoint.failed(IncompleteResponseError("cut"), 0.0)  # the server answered something
    assert not endpoint.failed(REFUSED, 0.0) and not endpoint.failed(REFUSED, 0.0)
    assert endpoint.failed(REFUSED, 5.0)
    assert (endpoint.state, endpoint.ejections, endpoint.down_since, endpoint.has_room()) == (EndpointState.EJECTED, 1, 5.0, False)


@pytest.mark.parametrize("error", [BadRequestError(400, "bad"), NotFoundError(404, "no model"), RateLimitError(429, "full")])
def test_4xx_never_eject(error: Exception) -> None:
    endpoint = _endpoint(eject_after=1)
    for _ in range(50):
        assert not endpoint.failed(error, 0.0)  # type: ignore[arg-type]
    assert endpoint.state is EndpointState.HEALTHY and endpoint.ejections == 0


def test_a_429_halves_the_limit_once_per_overload_and_successes_grow_it_back() -> None:
    endpoint = _endpoint(capacity=32)
    for _ in range(10):  # one burst of 429s: one decrease
        endpoint.failed(RateLimitError(429, "full"), 100.0)
    assert endpoint.limit == 16
    endpoint.failed(RateLimitError(429, "full"), 100.0 + DECREASE_GAP_S)
    assert endpoint.limit == 8
    for _ in range(8):  # above the threshold: one slot per `limit` successes (additive increase)
        endpoint.succeeded()
    assert 8.9 < endpoint.limit < 9.1
    for _ in range(2000):
        endpoint.succeeded()
    assert endpoint.limit == 32  # never above the configured concurrency


def test_the_last_healthy_server_is_ejected_only_when_it_cannot_be_reached() -> None:
    # A server that answers 5xx or is slow still answers: its rows end as error rows, they do not wait forever.
    for error in (ServerError(500, "boom"), APITimeoutError("slow")):
        endpoint = _endpoint(eject_after=2)
        for _ in range(10):
            assert not endpoint.failed(error, 0.0, last_standing=True)
        assert endpoint.state is EndpointState.HEALTHY
    endpoint = _endpoint(eject_after=2)
    assert not endpoint.failed(REFUSED, 0.0, last_standing=True)
    assert endpoint.failed(REFUSED, 0.0, last_standing=True)


def test_readmission_is_a_probe_then_one_trial_then_a_limit_that_ramps_up_from_one() -> None:
    endpoint = _endpoint(capacity=4, eject_after=1)
    endpoint.failed(REFUSED, 10.0)
    endpoint.probe_passed()
    assert endpoint.state is EndpointState.PROBING and endpoint.has_room()
    endpoint.in_flight = 1
    assert not endpoint.has_room()  # one trial request at a time
    endpoint.in_flight = 0
    # The trial fails: ejected again, counted as a failed probe, still down since the first ejection.
    assert endpoint.failed(REFUSED, 20.0)
    assert (endpoint.state, endpoint.trial_failures, endpoint.down_since, endpoint.ejections) == (EndpointState.EJECTED, 1, 10.0, 1)
    endpoint.probe_passed()
    assert endpoint.succeeded() and endpoint.state is EndpointState.HEALTHY and endpoint.readmissions == 1
    limits = [endpoint.limit]
    for _ in range(4):
        endpoint.succeeded()
        limits.append(endpoint.limit)
    assert limits == [1, 2, 3, 4, 4]


def test_the_only_server_is_readmitted_when_its_trial_gets_an_answer_even_a_500() -> None:
    endpoint = _endpoint(eject_after=1)
    endpoint.failed(REFUSED, 0.0, last_standing=True)
    endpoint.probe_passed()
    assert not endpoint.failed(ServerError(500, "boom"), 1.0, last_standing=True)
    assert endpoint.state is EndpointState.HEALTHY and endpoint.readmissions == 1
    endpoint.failed(REFUSED, 2.0, last_standing=True)
    endpoint.probe_passed()
    assert endpoint.failed(REFUSED, 3.0, last_standing=True)  # unreachable: ejected again
    assert endpoint.trial_failures == 1


def test_a_4xx_answer_to_the_trial_readmits_the_server() -> None:
    endpoint = _endpoint(eject_after=1)
    endpoint.failed(REFUSED, 0.0)
    endpoint.probe_passed()
    assert not endpoint.failed(BadRequestError(400, "the row's fault"), 1.0)
    assert endpoint.state is EndpointState.HEALTHY and endpoint.readmissions == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"url": ""}, "needs a url"), ({"url": "u", "concurrency": 0}, "concurrency"), ({"url": "u", "weight": 0}, "weight"),
     ({"url": "u", "weight": float("nan")}, "weight"), ({"url": "u", "concurrency": True}, "concurrency")],
)
def test_endpoint_spec_rejects_bad_values(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EndpointSpec(**fields)  # type: ignore[arg-type]


def test_the_work_estimate_learns_prompt_density_and_answer_length_from_usage() -> None:
    work = WorkEstimate()
    assert work.estimate(4064, 100) == pytest.approx(1000 + 100)  # 4 bytes a token, answers at the bound
    for _ in range(300):  # answers stop at a tenth of max_tokens; the tokenizer packs 2 bytes a token
        work.learn(4064, 100, 2000, 10)
    assert work.estimate(4064, 100) == pytest.approx(2000 + 10, rel=0.01)
    for _ in range(300):  # no max_tokens: the mean answer length is learned
        work.learn(4064, None, 2000, 50)
    assert work.estimate(4064, None) == pytest.approx(2000 + 50, rel=0.01)


def test_usage_tokens_reads_both_kinds_of_answer() -> None:
    from batchgen.parsing import parse_completion

    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}  # fmt: skip
    assert usage_tokens(parse_completion(body)) == (7, 3)
    assert usage_tokens({"usage": body["usage"]}) == (7, 3)
    assert usage_tokens({"usage": None}) == (None, None)


@pytest.mark.parametrize(
    ("url", "shown"),
    [("http://h:8000/v1", "http://h:8000/v1"), ("https://user:s3cret@h/v1", "https://h/v1"),
     ("https://h/openai/v1?api-key=s3cret", "https://h/openai/v1"), ("http://u:p@[::1]:9/v1", "http://[::1]:9/v1")],
)
def test_an_endpoint_is_shown_without_credentials_or_query(url: str, shown: str) -> None:
    assert Endpoint(Client(url), 1).url == shown
