"""Per-call speculation budget (voice/call/speculation.py): an endless
talker's pauses stop buying preemptive turns; a normal caller's do not."""

from __future__ import annotations

from voice.call.speculation import SpeculationBudget, SpeculationLimits


def test_a_burst_of_wasted_pauses_empties_the_bucket_then_it_refills() -> None:
    budget = SpeculationBudget(SpeculationLimits(burst=3, per_s=0.5))
    t = budget._at
    assert [budget.take(t) for _ in range(4)] == [True, True, True, False]
    assert budget.denied == 1 and not budget.available(t + 1.0)
    assert budget.available(t + 2.0) and budget.take(t + 2.0)  # one back every 2 s


def test_a_committed_preemptive_turn_gives_its_token_back() -> None:
    budget = SpeculationBudget(SpeculationLimits(burst=2, per_s=0.0))
    t = budget._at
    for _ in range(50):  # a caller whose every pause is the end of the turn never runs dry
        assert budget.take(t)
        budget.refund(t)
    assert budget.take(t) and budget.take(t) and not budget.take(t)


def test_a_normal_caller_with_a_few_mid_turn_pauses_keeps_speculating() -> None:
    budget = SpeculationBudget()
    t = budget._at
    for turn in range(20):  # a turn every 8 s: two pauses wasted, the third committed
        now = t + 8.0 * turn
        assert budget.take(now) and budget.take(now + 1.0) and budget.take(now + 2.0)
        budget.refund(now + 2.5)
