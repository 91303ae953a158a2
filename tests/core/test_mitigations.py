"""The mitigation table (cxrfair.core.mitigations): its rows are consistent, every stage that a
row names has registered the mitigation's term, and refusals name the fix."""

from __future__ import annotations

import math

import pytest

from cxrfair.core import mitigations as M
from cxrfair.core.runs import MITIGATIONS as RUN_NAMES
from cxrfair.errors import CxrfairError


def test_names_follow_the_table_and_erm_is_first_and_plain():
    assert M.NAMES == tuple(M.MITIGATIONS) == RUN_NAMES
    assert M.NAMES[0] == M.ERM and M.ERM in M.names(M.PROBE) and M.ERM in M.names(M.FINETUNE)
    erm = M.get(M.ERM)
    assert not erm.has_strength and not erm.needs_sensitive and not erm.zero_is_erm
    assert [m.name for m in M.MITIGATIONS.values() if not m.needs_sensitive] == [M.ERM]  # only erm targets no attribute
    assert set(M.names()) == set(M.names(M.PROBE)) | set(M.names(M.FINETUNE)) | set(M.names(M.POSTPROCESS))


@pytest.mark.parametrize("name", M.NAMES)
def test_each_row_is_consistent(name):
    m = M.get(name)
    assert m.name == name and m.summary and m.stages and set(m.stages) <= {M.PROBE, M.FINETUNE, M.CONTRASTIVE, M.POSTPROCESS}
    assert m.probe_solver in ("lbfgs", "adamw")
    assert m.low < m.high and not math.isnan(m.low)
    if not m.has_strength:
        assert m.probe_strengths == () and m.finetune_strength is None and m.postprocess_strength is None
        assert m.contrastive_strength is None
        assert not m.zero_is_erm
        return
    if M.PROBE in m.stages:  # the default grid: distinct strengths in range
        assert m.probe_strengths and len(set(m.probe_strengths)) == len(m.probe_strengths)
        assert all(m.strength_ok(v) for v in m.probe_strengths)
        assert M.check_strengths(name, m.probe_strengths) == m.probe_strengths
    else:
        assert m.probe_strengths == ()
    if M.FINETUNE in m.stages:  # one default run
        assert m.finetune_strength is not None and m.strength_ok(m.finetune_strength)
        assert M.check_strength(name, m.finetune_strength) == m.finetune_strength
    else:
        assert m.finetune_strength is None
    if M.POSTPROCESS in m.stages:  # one default run
        assert m.postprocess_strength is not None and m.strength_ok(m.postprocess_strength)
    else:
        assert m.postprocess_strength is None
    if M.CONTRASTIVE in m.stages:  # one default contrastive run
        assert m.contrastive_strength is not None and m.strength_ok(m.contrastive_strength)
    else:
        assert m.contrastive_strength is None
    if m.zero_is_erm:  # a default probe sweep carries its own ERM counterpart: like-for-like deltas
        assert M.PROBE not in m.stages or 0.0 in m.probe_strengths
        assert m.strength_ok(0.0) and M.check_strength(name, 0.0) == 0.0 and M.check_strengths(name, (0.0,)) == (0.0,)
    assert not m.strength_ok(math.inf) and not m.strength_ok(math.nan) and not m.strength_ok(m.low - 1)


def test_every_probe_mitigation_has_a_registered_term():
    from cxrfair.probe import objectives

    assert set(objectives.TERMS) == set(M.names(M.PROBE))
    for name, term in objectives.TERMS.items():
        assert isinstance(term, objectives.Term) and all(callable(f) for f in term)
        if M.get(name).has_strength:  # a mitigation with a strength has a loss of its own
            assert term is not objectives.PLAIN
    # A strength-less probe mitigation trains plain erm (erase: on erased features).
    assert objectives.TERMS[M.ERM] is objectives.PLAIN


def test_every_finetune_mitigation_has_a_registered_term():
    pytest.importorskip("torch")
    from cxrfair.finetune import objectives

    assert set(objectives.TERMS) == set(M.names(M.FINETUNE))
    assert objectives.TERMS[M.ERM] == objectives.Term()  # plain training touches no seam
    for name, term in objectives.TERMS.items():
        assert term.objective is None or issubclass(term.objective, objectives.Objective)
        assert term.row_weights is None or callable(term.row_weights)
        if M.get(name).has_strength:  # a strength acts through weights or an objective
            assert term.row_weights is not None or term.objective is not None


def test_rule_and_span_texts():
    assert (M.get("reweight").span(), M.get("reweight").rule()) == ("[0, 1]", "in [0, 1]")
    assert (M.get("groupdro").span(), M.get("groupdro").rule()) == ("(0, inf)", "> 0")
    assert (M.get("fairot").span(), M.get("fairot").rule()) == ("[0, inf)", ">= 0")


@pytest.mark.parametrize("call,needles", [
    (lambda: M.get("dropout"), ["--mitigation 'dropout'", "unknown", "groupdro"]),
    (lambda: M.get("dropout", M.FINETUNE), ["unknown", "fairot"]),
    (lambda: M.get("erase", M.FINETUNE), ["--mitigation erase", "probes only", "cxrfair probe"]),
    (lambda: M.get("thresholds", M.PROBE), ["--mitigation thresholds", "cxrfair postprocess"]),
    (lambda: M.check_strength("groupdro", 0.0), ["--strength 0.0", "groupdro", "(0, inf)"]),
    (lambda: M.check_strength("reweight", 1.5), ["--strength 1.5", "[0, 1]"]),
    (lambda: M.check_strength("erase", 1.0), ["erase takes no strength", "remove it"]),
    (lambda: M.check_strengths("groupdro", (0.1, 0.0)), ["--strength:", "groupdro strengths must be > 0", "got 0.1,0"]),
    (lambda: M.check_strengths("fairot", (-1.0,)), [">= 0"]),
    (lambda: M.check_strengths("erase", (1.0,)), ["--mitigation erase has no strength", "leave --strength out"]),
])
def test_refusals_name_the_fix(call, needles):
    with pytest.raises(CxrfairError) as err:
        call()
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_unknown_names_list_only_the_stage_s_mitigations():
    with pytest.raises(CxrfairError) as err:
        M.get("dropout", M.FINETUNE)
    assert "erase" not in str(err.value) and "thresholds" not in str(err.value)
    assert M.check_strengths("erase", ()) == ()


def test_adversaries_come_from_one_table_that_every_stage_reads():
    assert M.adversaries(M.PROBE) == ("grl", "projection")
    assert M.adversaries(M.FINETUNE) == M.adversaries(M.CONTRASTIVE) == ("grl",)
    assert set(M.ADVERSARIES) == {a for s in M.STAGE_WORDS for a in M.adversaries(s)}
