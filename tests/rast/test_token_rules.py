"""The per-slot token rules on hand-made slots: stop ids before and after min_tokens, the
continue text, budgets, and how a slot advances (the engine's step and speculative round
both call these)."""

import jax.numpy as jnp
import numpy as np

from jaxrast.rast.slots import Slots
from jaxrast.rast.token_rules import advance, force_continue, mask_early_stops, row_ends

VOCAB, STOP = 10, 7


def slots(**fields) -> Slots:
    """Three slots: stop id 7 (padded with VOCAB), budgets 5, min_tokens 3; slot 2 has the
    continue text [4, 5]."""
    s = 3
    base = dict(token=jnp.zeros(s, jnp.int32), length=jnp.full(s, 10, jnp.int32), generated=jnp.zeros(s, jnp.int32),
                budget=jnp.full(s, 5, jnp.int32), min_tokens=jnp.full(s, 3, jnp.int32), active=jnp.ones(s, bool),
                lam=jnp.zeros((s, 1), jnp.float32), rl_only=jnp.zeros(s, bool), temperature=jnp.ones(s),
                top_p=jnp.ones(s), top_k=jnp.zeros(s, jnp.int32),
                stop_ids=jnp.asarray([[STOP, VOCAB]] * s, jnp.int32), keys=jnp.zeros((s, 2), jnp.uint32),
                forced=jnp.asarray([[0, 0], [0, 0], [4, 5]], jnp.int32), forced_len=jnp.asarray([0, 0, 2], jnp.int32),
                forced_pos=jnp.full(s, -1, jnp.int32), gamma=jnp.zeros(s, jnp.int32),
                pages=jnp.zeros((s, 1), jnp.int32))
    base.update({k: jnp.asarray(v) for k, v in fields.items()})
    return Slots(**base)


def test_a_stop_id_is_masked_before_min_tokens_unless_a_continue_text_replaces_it():
    s = slots()
    z = jnp.zeros((3, VOCAB))
    early = jnp.asarray([True, False, True])
    out = np.asarray(mask_early_stops(z, s.stop_ids, early, s.forced_len))
    assert out[0, STOP] == -np.inf and out[1, STOP] == 0 and out[2, STOP] == 0
    assert np.all(np.delete(out, STOP, axis=1) == 0)  # nothing else moves; the padding id is dropped


def test_the_continue_text_starts_on_an_early_stop_and_runs_to_its_end():
    s = slots(generated=[1, 1, 1])
    tok, pos, forced = force_continue(jnp.asarray([STOP, STOP, STOP]), s)
    assert tok.tolist() == [STOP, STOP, 4] and pos.tolist() == [-1, -1, 1] and forced.tolist() == [False, False, True]
    s = s.replace(forced_pos=pos, generated=jnp.asarray([2, 2, 2]))
    tok, pos, forced = force_continue(jnp.asarray([3, 3, 3]), s)  # a started text goes on, whatever was drawn
    assert tok.tolist() == [3, 3, 5] and pos.tolist() == [-1, -1, -1] and forced.tolist() == [False, False, True]
    late = slots(generated=[4, 4, 4])  # past min_tokens a stop id is a stop
    assert force_continue(jnp.asarray([STOP] * 3), late)[0].tolist() == [STOP] * 3


def test_rows_end_on_a_stop_from_min_tokens_on_and_at_their_budget():
    s = slots()
    tokens = jnp.asarray([[STOP, 1, STOP, STOP, 1]] * 3)  # min_tokens 3: indices 0-2 cannot stop
    index = jnp.broadcast_to(jnp.arange(5), (3, 5))
    forced = jnp.zeros((3, 5), bool).at[1, 3].set(True)  # a forced token never stops a row
    stopped, ended = row_ends(tokens, index, s, forced)
    assert stopped.tolist() == [[False, False, False, True, False], [False] * 5, [False, False, False, True, False]]
    assert ended[:, 4].all() and not ended[1, :4].any()  # the budget of 5 ends every row at its 5th token


def test_advance_moves_only_active_slots_by_their_counts():
    s = slots(active=[True, False, True], forced_pos=[-1, -1, 1])
    out = advance(s, jnp.asarray([5, 6, 7]), jnp.asarray([3, 0, 1]), jnp.asarray([False, False, True]),
                  jnp.asarray([-1, -1, -1]))
    assert out.token.tolist() == [5, 0, 7] and out.length.tolist() == [13, 10, 11]
    assert out.generated.tolist() == [3, 0, 1] and out.active.tolist() == [True, False, False]
    assert out.forced_pos.tolist() == [-1, -1, -1]
