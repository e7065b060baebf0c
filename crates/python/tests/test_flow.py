"""starflow.Flow against the reference library's golden fixtures (jammy_flows 1.1.0, float64)."""

import json
from pathlib import Path

import numpy as np
import pytest

import starflow

FIXTURES = Path(__file__).resolve().parents[2] / "flows" / "tests" / "data"


@pytest.mark.parametrize("name,n_params", [("diagonal_gaussian", 6), ("full_gaussian", 9), ("full_flow", 306)])
def test_log_prob_equals_the_golden_fixtures(name, n_params):
    fx = json.loads((FIXTURES / f"jammy_logpdf_{name}.json").read_text())
    flow = starflow.Flow(name)
    assert (flow.name, flow.dim, flow.n_params) == (name, 3, n_params)
    params, x = np.array(fx["params"]), np.array(fx["x"])
    got = flow.log_prob(params, x)
    ref = np.array(fx["log_pdf"])
    assert got.shape == (len(ref),) and got.dtype == np.float64
    # The Rust golden test's tolerance: 1e-10 relative to max(|ref|, 1), on every row.
    assert np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1.0)) <= 1e-10


@pytest.mark.parametrize("name", starflow.FLOW_NAMES)
def test_sample(name):
    flow = starflow.Flow(name)
    rng = np.random.default_rng(0)
    params = 0.5 * rng.standard_normal((4, flow.n_params))
    s = flow.sample(params, 2000, seed=7)
    assert s.shape == (4, 2000, 3)
    assert np.array_equal(s, flow.sample(params, 2000, seed=7))
    assert not np.array_equal(s, flow.sample(params, 2000, seed=8))
    # The samples' density is the flow's: a Gaussian's mean log-density is -d/2 (1 + log 2 pi) - log|L|,
    # and for any flow the samples' mean log p is the negative entropy, finite and consistent.
    lp = flow.log_prob(np.repeat(params, 2000, axis=0), s.reshape(-1, 3)).reshape(4, 2000)
    assert np.isfinite(lp).all()
    if name != "full_flow":
        cov = np.array([np.cov(si.T) for si in s])
        entropy = 0.5 * np.log(np.linalg.det(2 * np.pi * np.e * cov))
        np.testing.assert_allclose(-lp.mean(axis=1), entropy, atol=0.1)


def test_float32_and_lists_are_converted():
    flow = starflow.Flow("diagonal_gaussian")
    params = [[0.1, -0.2, 0.3, 0.0, 0.5, -0.5]]
    x = np.array([[0.2, 0.1, -0.3]], dtype=np.float32)
    ref = flow.log_prob(np.array(params), x.astype(np.float64))
    assert np.array_equal(flow.log_prob(params, x), ref)


def test_bad_flow_arguments_raise_value_error():
    with pytest.raises(ValueError, match="unknown flow.*diagonal_gaussian"):
        starflow.Flow("triangular")
    flow = starflow.Flow("full_gaussian")
    with pytest.raises(ValueError, match=r"params: expected a float64 array of shape \(b, 9\)"):
        flow.log_prob(np.zeros((2, 6)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="params has 2 rows but x has 3"):
        flow.log_prob(np.zeros((2, 9)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"x: expected a float64 array of shape \(b, 3\)"):
        flow.log_prob(np.zeros((2, 9)), np.zeros(3))
