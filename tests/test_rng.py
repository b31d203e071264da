"""Named random streams: deterministic, independent across purposes and indices, clear errors."""

import pytest
import torch

from rdt_lib.rng import PURPOSES, rng_stream, stream_seed


def test_streams_are_deterministic_and_distinct():
    seeds = {(p, i): stream_seed(7, p, i) for p in PURPOSES for i in range(3)}
    assert len(set(seeds.values())) == len(seeds)  # no two (purpose, index) share a seed
    assert stream_seed(7, "renoise", 1) == seeds[("renoise", 1)]
    assert stream_seed(8, "renoise", 1) != seeds[("renoise", 1)]
    assert all(0 <= s < 2**63 for s in seeds.values())
    a = torch.randn(4, generator=rng_stream(7, "eta"))
    b = torch.randn(4, generator=rng_stream(7, "eta"))
    c = torch.randn(4, generator=rng_stream(7, "stop_step"))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_unknown_purpose_is_an_error():
    with pytest.raises(ValueError, match="unknown random-stream purpose"):
        stream_seed(1, "nope")
