"""The one-run empirical audit: canaries at a site, their accounting, and a lower bound that
catches broken DP-SGD (and stays below the accounted epsilon on the honest one)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from client.node_config import NodeConfig
from client.private_round import SitePrivacy, private_round
from client.run_config import RunConfig
from models.registry import build_model
from privacy.audit import EXIT_EMPIRICAL, run_audit_command
from privacy.canaries import RunCanaries
from privacy.empirical_audit import attainable_lower_bound, epsilon_lower_bound
from privacy.site_budget import SiteBudget
from simulations.audit_mechanisms import CLASSES, Setting, run_mechanism, site_data

SETTING = Setting(canaries=1000, target_epsilon=2.0)


@pytest.fixture(scope="module")
def audits(tmp_path_factory):
    """Every mechanism once, with 1000 gradient canaries at a claimed epsilon of about 2."""
    root = tmp_path_factory.mktemp("mechanisms")
    return {m: run_mechanism(m, SETTING, root) for m in ("honest", "no-clipping", "noise/100", "replayed-noise")}, root


def test_the_honest_mechanism_stays_below_its_accounted_epsilon(audits):
    honest = audits[0]["honest"]
    assert 1.0 < honest.epsilon_accounted <= 2.0
    assert honest.empirical_epsilon_lower < honest.epsilon_accounted
    assert not honest.violated
    # One run of 1000 canaries could prove far more than 2: the audit had the power to fail.
    assert honest.empirical_epsilon_max > 2 * honest.epsilon_accounted


@pytest.mark.parametrize("mechanism", ["no-clipping", "noise/100", "replayed-noise"])
def test_each_broken_mechanism_is_caught(audits, mechanism):
    audit = audits[0][mechanism]
    assert audit.epsilon_accounted == pytest.approx(audits[0]["honest"].epsilon_accounted)  # the ledger cannot tell
    assert audit.empirical_epsilon_lower > audit.epsilon_accounted
    assert audit.violated


def test_fedvid_audit_empirical_exits_non_zero_on_a_leaking_site_and_zero_on_an_honest_one(audits, capsys):
    _, root = audits
    assert run_audit_command(None, as_json=True, site_dirs=[root / "honest"], empirical=True) == 0
    clean = json.loads(capsys.readouterr().out)
    assert clean["empirical_ok"] is True
    assert 0 <= clean["sites"]["site-0"]["empirical_epsilon_lower"] < clean["sites"]["site-0"]["epsilon"]

    code = run_audit_command(None, as_json=True, site_dirs=[root / "noise-100"], empirical=True)
    leaking = json.loads(capsys.readouterr().out)
    assert code & EXIT_EMPIRICAL
    site = leaking["sites"]["site-0"]
    assert site["empirical_epsilon_lower"] > site["empirical"][0]["epsilon_accounted"]
    assert any("ABOVE the accounted epsilon" in e for e in leaking["errors"])


def test_an_empirical_audit_without_canaries_is_an_error_not_a_clean_result(audits, tmp_path, capsys):
    _, root = audits
    plain = tmp_path / "plain"
    node = NodeConfig(partition_id=0, num_partitions=1, epsilon_budget=100.0)
    config = RunConfig.from_mapping({**SETTING.run_config().to_mapping(), "audit-canaries": 0})
    private_round(build_model(config.model_spec(2)), site_data(50), config, SitePrivacy("site-0", plain, node),
                  "plain", 1, torch.device("cpu"))
    assert run_audit_command(None, as_json=True, site_dirs=[plain], empirical=True) & EXIT_EMPIRICAL
    assert run_audit_command(None, as_json=True, site_dirs=[plain]) == 0  # without --empirical: clean
    capsys.readouterr()


def test_canaries_are_units_of_their_own_in_the_budget_and_the_sample_rate(audits):
    _, root = audits
    canaries = RunCanaries.load(RunCanaries.path_for(root / "honest", "audit"))
    budget = SiteBudget.open_existing(root / "honest")
    inside, outside = canaries.unit_ids(), [f"canary:audit:{i}" for i in np.flatnonzero(~canaries.included)]
    assert 400 < len(inside) < 600  # each in with probability 1/2
    assert all(budget.unit_history(u) for u in inside[:50])
    assert not any(budget.unit_history(u) for u in outside[:50])  # out canaries are in no data
    assert budget.unit_count() == SETTING.units + len(inside)
    (charge,) = budget.charges()
    # q counts all 1200 slots, in or out: the mechanism's parameters do not depend on membership.
    assert charge["sample_rate"] == 1 / math.ceil((SETTING.units + SETTING.canaries) / SETTING.batch_size)
    assert charge["steps_taken"] == SETTING.local_epochs * math.ceil(1200 / SETTING.batch_size)


def test_the_canary_set_is_the_sites_and_fixed_for_the_run(tmp_path):
    """Membership from the site's own entropy (two sites differ), fixed at the first round: a
    coordinator asking for other canaries later changes nothing."""
    a = RunCanaries.for_run(tmp_path / "a", "run", "gradient", 200)
    b = RunCanaries.for_run(tmp_path / "b", "run", "gradient", 200)
    assert not np.array_equal(a.included, b.included)
    again = RunCanaries.for_run(tmp_path / "a", "run", "input", 50)
    assert (again.kind, again.count) == ("gradient", 200) and np.array_equal(again.included, a.included)
    assert a.secret not in json.dumps(a.unit_ids())  # unit ids name the canary, never the secret


def test_a_site_can_refuse_canaries_through_its_node_config(tmp_path):
    config = SETTING.run_config()
    node = NodeConfig(partition_id=0, num_partitions=1, epsilon_budget=100.0, allow_audit_canaries=False)
    private_round(build_model(config.model_spec(len(CLASSES))), site_data(50), config,
                  SitePrivacy("site-0", tmp_path, node), "run", 1, torch.device("cpu"))
    assert not RunCanaries.exists(tmp_path, "run")
    (charge,) = SiteBudget.open_existing(tmp_path).charges()
    assert charge["sample_rate"] == 1.0  # 50 units, batch 300: no canary slots
    assert SiteBudget.open_existing(tmp_path).unit_count() == 50


def test_gradient_canaries_need_a_model_with_more_coordinates_than_canaries(tmp_path):
    canaries = RunCanaries.for_run(tmp_path, "run", "gradient", 50)
    with pytest.raises(ValueError, match="at least as many parameters"):
        canaries.dirac(49)


def test_the_bound_ranks_in_above_out_and_is_capped_by_the_canary_count():
    rng = np.random.default_rng(0)
    separated = epsilon_lower_bound(rng.normal(3, 1, 500), rng.normal(0, 1, 500), 1e-5)
    swapped = epsilon_lower_bound(rng.normal(0, 1, 500), rng.normal(3, 1, 500), 1e-5)
    assert separated > 1.5 and swapped == 0.0
    assert separated <= attainable_lower_bound(500, 500, 1e-5)
    assert attainable_lower_bound(50, 50, 1e-5) < attainable_lower_bound(500, 500, 1e-5)
    with pytest.raises(ValueError, match="NaN or infinite"):
        epsilon_lower_bound(np.array([1.0, np.nan]), np.array([0.0]), 1e-5)


def test_with_a_frozen_backbone_the_canaries_land_on_the_trained_layers_and_still_catch_a_leak(tmp_path):
    """The frozen-backbone recipe (`trainable-layers`) changes what DP-SGD updates. Canaries on a
    frozen coordinate would see no gradient and catch nothing: the leak is caught only if they
    land on the trained layers."""
    frozen = Setting(canaries=1000, target_epsilon=2.0, trainable_layers="body.6,head")
    honest = run_mechanism("honest", frozen, tmp_path)
    leaking = run_mechanism("no-clipping", frozen, tmp_path)
    assert not honest.violated and honest.empirical_epsilon_lower < honest.epsilon_accounted
    assert leaking.violated and leaking.empirical_epsilon_lower > leaking.epsilon_accounted
