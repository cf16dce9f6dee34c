"""One setting θ, one name: the ids stages 04, 05 and 06 share."""

import pytest

from rephelpers.errors import RephelpersError
from rephelpers.abilities.evaluation import cluster_configs
from rephelpers.influence.impact import BASELINE_CLUSTER, simulate_scores
from rephelpers.setting import BASELINE_ID, Setting, parse_id


def test_a_setting_names_itself_and_its_control_draws():
    theta = Setting(2, "mean_ablate", 0.5, layer=15)
    assert (theta.id, theta.arm) == ("k2:mean_ablate:m0.5", "perturbation")
    assert [theta.control_draw(j).id for j in range(3)] == [
        "k2:mean_ablate:m0.5:control", "k2:mean_ablate:m0.5:control1", "k2:mean_ablate:m0.5:control2"]
    assert theta.control_draw(2).arm == "control" and theta.control_draw(2).meta() == {
        "cluster": 2, "control": True, "kind": "mean_ablate", "magnitude": 0.5, "layer": 15, "draw": 2}
    base = Setting.baseline(15)
    assert (base.id, base.arm, base.cluster) == (BASELINE_ID, "baseline", BASELINE_CLUSTER)
    for setting in (theta, theta.control_draw(4), Setting(0, "shift", -1.5), base):
        parsed = parse_id(setting.id)
        assert (parsed["cluster"], parsed["kind"], parsed["magnitude"], parsed["control"], parsed["draw"]) == (
            setting.cluster, setting.kind, setting.magnitude, setting.control, setting.draw)
    assert parse_id("k1-ablate-m2-control3")["draw"] == 3  # ids written before the colon form


def test_impossible_settings_are_refused():
    with pytest.raises(RephelpersError, match="baseline has no control"):
        Setting.baseline().control_draw(1)
    with pytest.raises(RephelpersError, match="only a control has a draw"):
        Setting(0, "ablate", 1.0, draw=2)
    with pytest.raises(RephelpersError, match="cluster is ≥ 0"):
        Setting(-3, "ablate", 1.0)
    with pytest.raises(RephelpersError, match="not a setting id"):
        parse_id("ablate everything")


def test_stage_05_and_the_simulator_use_the_setting_ids():
    subspaces = [{"layer": 15, "cluster": k, "dims": [k, k + 3], "mean_out": [0.0] * 8, "std": [1.0] * 8} for k in (0, 1)]
    configs, meta = cluster_configs(subspaces, 15, 8, kinds="ablate", magnitudes=[1.0], n_controls=2)
    for cid, setting in meta.items():
        assert isinstance(setting, Setting) and setting.id == cid
        m = setting.meta()  # the score row's columns rebuild the same setting
        assert Setting(m["cluster"], m["kind"], m["magnitude"], m["layer"], control=m["control"], draw=m["draw"]) == setting
    scores = simulate_scores({(0, "a"): 0.5}, {"a": 0.8}, n_controls=2, magnitudes=(1.0,), items_per_task=4)
    assert sorted(scores["config_id"].unique()) == sorted(
        ["baseline", "k0:ablate:m1", "k0:ablate:m1:control", "k0:ablate:m1:control1"])
