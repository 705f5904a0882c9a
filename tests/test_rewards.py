"""Verifiable rewards and group-relative advantages (padd_ds/rl/rewards.py)."""

import math

import pytest
import torch

from padd_ds.config import ConfigError, Stage3Config
from padd_ds.eval.grading import grade
from padd_ds.recipe import load_config
from padd_ds.rl.rewards import equations, group_advantages, has_answer_marker, reward, score, step_credit
from padd_ds.validate import validate


@pytest.mark.parametrize("response, reference, correct, formatted", [
    ("3 + 4 = 7. #### 7", "7", 1.0, 1.0),               # toy/GSM8K form
    ("so we get \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0, 1.0),
    ("Thus the answer is 42.", "42", 1.0, 1.0),
    ("I count 5 and then 7", "7", 1.0, 0.0),             # right, but only via the last-number fallback
    ("3 + 4 = 8. #### 8", "7", 0.0, 1.0),               # formatted but wrong
    ("no idea", "7", 0.0, 0.0),
    ("#### \n7", "7", 1.0, 0.0),                         # empty marker line: no stated answer
    ("\\boxed{} 7", "7", 1.0, 0.0),                      # empty box
])
def test_reward_is_weighted_correctness_plus_format(response, reference, correct, formatted):
    cfg = Stage3Config(reward_correct=1.0, reward_format=0.25)
    r, parts = reward(response, reference, cfg)
    assert parts == {"correct": correct, "format": formatted}
    assert r == pytest.approx(1.0 * correct + 0.25 * formatted)


def test_format_term_only_rewards_markers_the_grader_reads():
    # Every marker the format term accepts must be one the shared grader extracts from:
    # a response "#### 12" etc. grades as 12 even when other numbers follow.
    for response in ("#### 12\nthen 99", "\\boxed{12} then 99", "The answer is: 12, then 99"):
        assert has_answer_marker(response)
        assert grade(response, "12")


def test_default_weights_keep_any_correct_answer_above_any_wrong_one():
    cfg = Stage3Config()
    best_wrong, _ = reward("#### 8", "7", cfg)
    worst_right, _ = reward("it is 7", "7", cfg)
    assert worst_right > best_wrong > 0


def test_group_advantages_population_std_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0],      # mean 0.25, std sqrt(3)/4
                            [1.1, 1.1, 0.1, 0.0]])     # mean 0.575, std 0.5261...
    adv, stats = group_advantages(rewards)
    s = math.sqrt(3) / 4
    torch.testing.assert_close(adv[0], torch.tensor([0.75 / s, -0.25 / s, -0.25 / s, -0.25 / s]))
    mean, std = 0.575, math.sqrt(((0.525 ** 2) * 2 + 0.475 ** 2 + 0.575 ** 2) / 4)
    torch.testing.assert_close(adv[1], torch.tensor([0.525 / std, 0.525 / std, -0.475 / std, -0.575 / std]))
    # population std: each group's advantages have mean 0 and mean square 1
    torch.testing.assert_close(adv.mean(1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close((adv ** 2).mean(1), torch.ones(2))
    assert stats["zero_variance_groups"] == 0 and stats["groups"] == 2
    assert stats["reward_mean"] == pytest.approx((0.25 + mean) / 2)


def test_two_responses_get_exactly_plus_minus_one():
    adv, _ = group_advantages(torch.tensor([[0.0, 1.0]]))
    assert adv.tolist() == [[-1.0, 1.0]]


def test_zero_variance_groups_get_zero_advantage_and_are_counted():
    rewards = torch.tensor([[1.1, 1.1, 1.1], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.1, 0.1, 0.1]])
    adv, stats = group_advantages(rewards)
    assert stats["zero_variance_groups"] == 3
    assert torch.equal(adv[[0, 1, 3]], torch.zeros(3, 3))
    assert torch.isfinite(adv).all() and (adv[2] != 0).all()


def test_bad_reward_shapes_are_refused():
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.zeros(4, 1))
    with pytest.raises(ValueError, match=r"\[num_prompts, G\]"):
        group_advantages(torch.zeros(8))
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([[0.0, float("nan")]]))


def test_negative_reward_weights_are_refused_by_validate():
    with pytest.raises(ConfigError, match="stage3.reward_format must be >= 0"):
        validate(load_config(None, ["stage3.reward_format=-0.1"]))
    with pytest.raises(ConfigError, match="stage3.reward_steps must be >= 0"):
        validate(load_config(None, ["stage3.reward_steps=-1"]))


TOY_SOLUTION = ("Ann has 5 apples. She buys 3 more. 5 + 3 = 8. She gives 2 apples to Ben. 8 - 2 = 6. "
                "The pile grows 2 times. 6 * 2 = 12. #### 12")


def test_equations_read_the_toy_and_gsm8k_forms():
    assert equations(TOY_SOLUTION) == [(5, "+", 3, 8), (8, "-", 2, 6), (6, "*", 2, 12)]
    # GSM8K: the <<...>> annotation counts; the "48/2 = " before it has no result of its own
    gsm = "Natalia sold 48/2 = <<48/2=24>>24 clips in May. 3x4=12, 2 \u00d7 3 = 6, 10.5-2=8.5, 12-15=-3"
    assert equations(gsm) == [(48, "/", 2, 24), (3, "*", 4, 12), (2, "*", 3, 6), (10.5, "-", 2, 8.5), (12, "-", 15, -3)]
    assert equations("Ann has 5 apples and 3 pears") == []


@pytest.mark.parametrize("response, credit", [
    ("5 + 3 = 8. 8 - 2 = 6. 6 * 2 = 12. #### 12", 1.0),
    ("5 + 3 = 8. 8 - 2 = 5. 5 * 2 = 10. #### 10", 1 / 3),     # a wrong step loses every step built on it
    ("5 + 3 = 9. 9 - 2 = 7. 7 * 2 = 14. #### 14", 0.0),
    ("5+3=8 then 8 - 2 = 6 and 6 x 2 = 12", 1.0),             # spacing and x for * do not matter
    ("5 + 3 = 8. 5 + 3 = 8. 5 + 3 = 8. #### 8", 1 / 3),       # a repeated step counts once
    ("#### 12", 0.0),                                          # the answer alone is not the way there
])
def test_step_credit_is_the_share_of_reference_equations_stated(response, credit):
    assert step_credit(response, TOY_SOLUTION, correct=0.0) == pytest.approx(credit)


def test_step_credit_without_reference_equations_is_correctness():
    assert step_credit("#### 7", "The answer is 7.", correct=1.0) == 1.0
    assert step_credit("#### 8", None, correct=0.0) == 0.0


def test_reward_steps_adds_partial_credit_and_keeps_right_answers_on_top():
    cfg = Stage3Config(reward_steps=1.0)
    right, parts = reward("5 + 3 = 8. 8 - 2 = 6. 6 * 2 = 12. #### 12", "12", cfg, TOY_SOLUTION)
    assert parts == {"correct": 1.0, "format": 1.0, "steps": 1.0} and right == pytest.approx(2.1)
    partial, parts = reward("5 + 3 = 8. 8 - 2 = 6. 6 * 2 = 11. #### 11", "12", cfg, TOY_SOLUTION)
    assert parts["steps"] == pytest.approx(2 / 3) and partial == pytest.approx(0.1 + 2 / 3)
    nothing, _ = reward("5 + 3 = 9. #### 9", "12", cfg, TOY_SOLUTION)
    assert right > partial > nothing == pytest.approx(0.1)
    # off (the default): the reward and its parts are exactly the paper's
    assert reward("5 + 3 = 8. #### 12", "12", Stage3Config(), TOY_SOLUTION) == (1.1, {"correct": 1.0, "format": 1.0})


def test_shuffled_advantages_are_a_seeded_permutation():
    """The control arm (stage3.shuffle_advantages): the same advantages, other rows, reproducibly."""
    from padd_ds.rl.rewards import shuffled

    adv = torch.arange(32, dtype=torch.float32)
    a, b, c = shuffled(adv, 7), shuffled(adv, 7), shuffled(adv, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a.sort().values, adv) and not torch.equal(a, adv)


def test_score_grades_each_group_against_its_own_problem_and_solution():
    """The rollout batch's rewards: response i answers problem i // G, with that problem's
    reference solution for the step credit (a problem without one: credit = correctness)."""
    problems = [{"answer": "12", "solution": TOY_SOLUTION}, {"answer": "7"}]
    responses = ["5 + 3 = 8. 8 - 2 = 6. 6 * 2 = 11. #### 11", "#### 12",   # problem 0: no step stated
                 "#### 7", "3 + 4 = 8. #### 8"]                            # problem 1
    rewards, parts = score(responses, problems, 2, Stage3Config(reward_steps=1.0))
    torch.testing.assert_close(rewards, torch.tensor([[0.1 + 2 / 3, 1.1], [2.1, 0.1]]))
    assert [d["correct"] for d in parts] == [0.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="stage3.group_size"):
        score(responses, problems, 4, Stage3Config())
