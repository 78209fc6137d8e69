"""GRPO math against hand-computed numbers: advantages, clipping on both sides, k3 KL,
aggregation modes; plus the host-side helpers (prompt stream, padding, rewards)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrast.grpo.batch import PromptStream, build_rollout, pack_zero_advantage, split_micro
from jaxrast.grpo.losses import aggregate, group_advantages, grpo_token_loss, k3_kl, token_logprobs, token_weights
from jaxrast.grpo.rewards import MathReward, Reward, as_rewards, compute_rewards

# Four sequences of two completion tokens, old log-probs 0 so that ratio = exp(logp).
RATIOS = np.array([[1.5, 0.5], [0.5, 1.5], [1.2, 0.7], [1.1, 1.0]])
ADV = np.array([1.0, -1.0, 0.0, 2.0])  # seq 2 comes from a zero-variance group
MASK = np.array([[1, 1], [1, 1], [1, 0], [1, 0]], np.float32)
EPS_LOW, EPS_HIGH = 0.2, 0.28
# -min(ρA, clip(ρ, 0.8, 1.28)A) token by token:
#   seq0 A=+1: ρ=1.5 -> clipped at 1.28 -> -1.28 (high clip); ρ=0.5 -> -0.5 (low ratio, A>0: not clipped)
#   seq1 A=-1: ρ=0.5 -> clip 0.8 -> min(-0.5, -0.8) = -0.8 -> +0.8 (low clip); ρ=1.5 -> min(-1.5, -1.28) -> +1.5
#   seq2 A=0: 0, 0;   seq3 A=2: ρ=1.1 -> -2.2 (second token masked)
HAND_LOSS = np.array([[-1.28, -0.5], [0.8, 1.5], [0.0, 0.0], [-2.2, -2.0]])


def test_group_advantages_hand_computed():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]])
    adv, zero = group_advantages(rewards, eps=1e-6)
    # group 0: mean 0.5, std 0.5; group 2: mean 2, std sqrt(0.5)
    np.testing.assert_allclose(adv[0], np.array([0.5, -0.5, -0.5, 0.5]) / 0.500001, rtol=1e-12)
    np.testing.assert_array_equal(adv[1], 0.0)
    np.testing.assert_allclose(adv[2], np.array([1.0, -1.0, 0.0, 0.0]) / (math.sqrt(0.5) + 1e-6), rtol=1e-12)
    assert zero.tolist() == [False, True, False]
    dr, zero_dr = group_advantages(rewards, scale=False)  # Dr. GRPO: no std division
    np.testing.assert_allclose(dr, [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [1, -1, 0, 0]])
    assert zero_dr.tolist() == zero.tolist()


def test_equal_rewards_give_exactly_zero_advantage():
    # 0.1 * 8 / 8 != 0.1 in floats: r - mean(r) leaves a residue that must not survive
    adv, zero = group_advantages(np.full((1, 8), 0.1))
    assert zero.tolist() == [True] and np.all(adv == 0.0)


def test_pack_zero_advantage():
    adv = np.array([0.0, 1.0, 0.0, 0.0, -1.0, 0.0, 2.0, 0.0])
    order, active = pack_zero_advantage(adv, 2)
    assert order.tolist() == [1, 4, 6, 0, 2, 3, 5, 7]  # nonzero rows first, both parts stable
    assert active.tolist() == [True, True, False, False]
    order, active = pack_zero_advantage(adv, 4)
    assert active.tolist() == [True, False]
    order, active = pack_zero_advantage(adv, 2, enabled=False)
    assert order.tolist() == list(range(8)) and active.all()


def test_clipped_loss_both_sides():
    out = grpo_token_loss(jnp.log(jnp.asarray(RATIOS)), jnp.zeros((4, 2)), jnp.asarray(ADV),
                          epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)
    np.testing.assert_allclose(out.loss, HAND_LOSS, atol=1e-6)
    assert np.asarray(out.clipped_high).tolist() == [[True, False], [False, False], [False, False], [False, False]]
    assert np.asarray(out.clipped_low).tolist() == [[False, False], [True, False], [False, False], [False, False]]
    np.testing.assert_array_equal(out.kl, 0.0)  # no reference


def test_clipped_tokens_get_no_gradient():
    def total(logp):
        return jnp.sum(grpo_token_loss(logp, jnp.zeros((4, 2)), jnp.asarray(ADV),
                                       epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH).loss)
    grad = np.asarray(jax.grad(total)(jnp.log(jnp.asarray(RATIOS))))
    # d(-ρA)/dlogp = -ρA where the unclipped term is active, 0 where the clip is
    np.testing.assert_allclose(grad, [[0.0, -0.5], [0.0, 1.5], [0.0, 0.0], [-2.2, -2.0]], atol=1e-6)


def test_k3_kl_and_beta():
    logp = jnp.log(jnp.asarray(RATIOS))
    d = np.array([[math.log(2.0), 0.0], [math.log(0.5), 0.0], [0, 0], [0, 0]])
    np.testing.assert_allclose(k3_kl(logp, logp + d),
                               [[2 - math.log(2) - 1, 0], [0.5 + math.log(2) - 1, 0], [0, 0], [0, 0]], atol=1e-6)
    out = grpo_token_loss(logp, jnp.zeros((4, 2)), jnp.asarray(ADV), epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                          ref_logp=logp + d, beta=0.1)
    expect = HAND_LOSS.copy()
    expect[0, 0] += 0.1 * 0.30685282  # 2 - ln 2 - 1
    expect[1, 0] += 0.1 * 0.19314718  # 0.5 + ln 2 - 1
    np.testing.assert_allclose(out.loss, expect, atol=1e-6)
    assert float(jnp.min(k3_kl(logp, logp + jnp.asarray(np.random.default_rng(0).normal(size=(4, 2)))))) >= 0


def test_aggregation_modes_hand_computed():
    loss = jnp.asarray(HAND_LOSS)
    # 6 real tokens summing to -1.68; per-sequence means -0.89, 1.15, 0, -2.2; max_len 4
    assert float(aggregate(loss, MASK, "token_mean", 4)) == pytest.approx(-1.68 / 6, abs=1e-6)
    assert float(aggregate(loss, MASK, "seq_mean_token_mean", 4)) == pytest.approx(-1.94 / 4, abs=1e-6)
    assert float(aggregate(loss, MASK, "dr_grpo", 4)) == pytest.approx(-1.68 / 16, abs=1e-6)
    with pytest.raises(ValueError, match="aggregation"):
        token_weights(MASK, "mean", 4)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "dr_grpo"])
def test_micro_batches_sum_to_the_full_batch_loss(mode):
    w = token_weights(MASK, mode, 4)
    halves = sum(float(jnp.sum(jnp.asarray(HAND_LOSS[s]) * w[s])) for s in (slice(0, 2), slice(2, 4)))
    assert halves == pytest.approx(float(aggregate(jnp.asarray(HAND_LOSS), MASK, mode, 4)), abs=1e-6)


def test_token_logprobs_and_entropy():
    logits = jnp.asarray([[[0.0, math.log(3.0)]]])
    logp, ent = token_logprobs(logits, jnp.asarray([[1]]))
    assert float(logp[0, 0]) == pytest.approx(math.log(0.75), abs=1e-6)
    assert float(ent[0, 0]) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)
    logp2, _ = token_logprobs(logits, jnp.asarray([[1]]), temperature=2.0)  # softmax(z / 2)
    assert float(logp2[0, 0]) == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))), abs=1e-6)


def test_prompt_stream_is_seeded_and_resumable():
    a = PromptStream(5, seed=3)
    first = a.take(7)  # wraps into epoch 1
    assert sorted(first[:5]) == list(range(5)) and a.state() == {"epoch": 1, "index": 2}
    b = PromptStream(5, seed=3)
    b.load_state(a.state())
    assert a.take(6) == b.take(6)
    assert PromptStream(4, seed=0, shuffle=False).take(6) == [0, 1, 2, 3, 0, 1]


def test_build_rollout_layout():
    arr = build_rollout([[5, 6, 7], [8]], [[1], [9, 9, 1]], [[-0.5], [-1.0, -2.0, -3.0]], pad_id=0,
                        max_new_tokens=8)
    assert arr.prompt_width == 16 and arr.completion_width == 8  # bucketed, capped at max_new_tokens
    assert arr.tokens[0, 13:17].tolist() == [5, 6, 7, 1] and arr.tokens[1, 15:19].tolist() == [8, 9, 9, 1]
    assert arr.mask[0].sum() == 4 and not arr.mask[0, 12] and not arr.mask[0, 17]
    assert arr.completion_mask.sum(1).tolist() == [1, 3]
    assert arr.sampler_logp[1, :4].tolist() == [-1.0, -2.0, -3.0, 0.0]
    assert split_micro(arr.tokens, 1).shape == (2, 1, 24)


def test_rewards_weighted_sum_with_row_columns():
    seen = {}

    def length(prompts, completions, **cols):
        seen.update(cols)
        return [len(c) for c in completions]

    math_reward = MathReward(processes=0)  # judge in-process
    rewards = as_rewards([Reward("math", math_reward, 1.0), (length, 0.5)])
    rows = [{"id": "1", "answer": "4", "level": 2}, {"id": "2", "answer": "5"}]
    total, parts = compute_rewards(rewards, ["q", "q"], ["so \\boxed{4}", "the answer is 6"], rows)
    assert math_reward(["q"] * 3, ["\\boxed{42}", "\\boxed{27}", "\\boxed{3}"], answer=[42, 27.0, ["2", "3"]]) \
        == [1.0, 1.0, 1.0]  # numeric golds (a Python API caller's rows) and lists of golds
    with pytest.raises(ValueError, match="no answer for completion 1"):
        math_reward(["q", "q"], ["1", "2"], answer=["1", None])
    math_reward.close()
    assert parts["math"].tolist() == [1.0, 0.0]
    np.testing.assert_allclose(total, [1.0 + 0.5 * 12, 0.5 * 15])
    assert seen["answer"] == ["4", "5"] and seen["level"] == [2, None]
    with pytest.raises(ValueError, match="returned 1 values"):
        compute_rewards(as_rewards([lambda p, c, **k: [1.0]]), ["q", "q"], ["a", "b"], rows)
    with pytest.raises(ValueError, match="module:function"):
        as_rewards(["not_a_reward"])
