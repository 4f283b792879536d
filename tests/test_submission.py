import pandas as pd
import pytest

from reid.data import DataError
from reid.submission import score, validate_submission, write_submission


def test_validate_submission_errors():
    good = pd.DataFrame({"image": ["a.jpg", "b.jpg"], "predictions": ["1 2 3 4 5", "new_individual 1 2 3 4"]})
    validate_submission(good, ["a.jpg", "b.jpg"])
    with pytest.raises(DataError, match="missing"):
        validate_submission(good, ["a.jpg", "b.jpg", "c.jpg"])
    with pytest.raises(DataError, match="five unique"):
        validate_submission(good.assign(predictions=["1 2 3 4", "1 1 2 3 4"]), ["a.jpg", "b.jpg"])
    with pytest.raises(DataError, match="twice"):
        validate_submission(pd.concat([good, good]), ["a.jpg", "b.jpg"])
    with pytest.raises(DataError, match="header"):
        validate_submission(good.rename(columns={"predictions": "pred"}), ["a.jpg", "b.jpg"])


def test_invalid_submission_is_not_written(tmp_path):
    out = tmp_path / "sub.csv"
    with pytest.raises(DataError):
        write_submission(out, ["a.jpg"], [["x", "y"]])
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_score_splits_known_and_new(tmp_path):
    sol = tmp_path / "solution.csv"
    sub = tmp_path / "sub.csv"
    pd.DataFrame({"image": ["a", "b", "c", "d"], "individual_id": ["x", "y", "new_individual", "new_individual"]}
                 ).to_csv(sol, index=False)
    write_submission(sub, ["a", "b", "c", "d"], [["x", "new_individual", "1", "2", "3"],
                                                 ["new_individual", "x", "y", "1", "2"],
                                                 ["new_individual", "x", "y", "1", "2"],
                                                 ["x", "y", "1", "2", "3"]])
    s = score(sub, sol)
    assert s["map5_known"] == pytest.approx((1 + 1 / 3) / 2)
    assert s["map5_new"] == pytest.approx(0.5)
    assert s["map5"] == pytest.approx((1 + 1 / 3 + 1) / 4)
    assert s["trivial_map5"] == pytest.approx(0.5) and s["share_new"] == 0.5
