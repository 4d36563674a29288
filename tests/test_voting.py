import numpy as np
import pytest

from geoindex.voting import estimate_locations, gps_estimate, haversine_km, vote


def test_vote_methods():
    labels = np.array([[0, 1, 1, -1]])
    sims = np.array([[0.9, 0.5, 0.4, -3e38]])
    np.testing.assert_allclose(vote(labels, sims, 3, "majority"), [[1 / 3, 2 / 3, 0]])
    np.testing.assert_allclose(vote(labels, sims, 3, "weighted"), [[0.5, 0.5, 0]], atol=1e-9)
    soft = vote(labels, sims, 3, "softmax", temperature=0.05)
    assert soft[0, 0] > 0.99 and soft.sum() == pytest.approx(1)
    hot = vote(labels, sims, 3, "softmax", temperature=100)
    np.testing.assert_allclose(hot, vote(labels, sims, 3, "majority"), atol=1e-2)
    np.testing.assert_allclose(vote(np.array([[-1, -1]]), np.array([[0.1, 0.2]]), 4), [[0.25] * 4])
    with pytest.raises(ValueError):
        vote(labels, sims, 3, "plurality")


def test_gps_mean_crosses_the_date_line_and_medoid_picks_a_member():
    lat, lon = gps_estimate([0, 0], [179, -179])
    assert lat == pytest.approx(0, abs=1e-9) and abs(lon) == pytest.approx(180)
    assert gps_estimate([10, 11, 50], [0, 0, 0], method="medoid") == (11.0, 0.0)
    assert np.isnan(gps_estimate([np.nan], [np.nan])[0])


def test_haversine_paris_london():
    assert haversine_km(48.8566, 2.3522, 51.5072, -0.1276) == pytest.approx(343.5, abs=2)


def test_estimate_uses_only_the_winning_city():
    labels = np.array([[0, 1, 0]])
    out = estimate_locations(labels, np.array([[0.9, 0.8, 0.7]]), np.array([[10.0, 50.0, 12.0]]),
                             np.array([[0.0, 0.0, 0.0]]), winners=[0], method="majority")
    assert out[0, 0] == pytest.approx(11, abs=0.01)
