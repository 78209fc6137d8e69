"""A decode call costs its live rows: it runs at the smallest compiled slot count (bucket)
that holds them, rows packed into the low slots; and the engine's slot count comes from
the KV memory. A row's greedy tokens do not depend on the bucket it ran in."""

import logging

import numpy as np
import pytest
from reference_decoder import assert_same_up_to_ties, reference_decode

from jaxrast.rast.capacity import kv_memory_bytes, plan_slots, slot_bytes
from jaxrast.rast.decoding import RAST, SamplingParams
from jaxrast.rast.engine_spec import EngineSpec, power_buckets
from jaxrast.rast.ensemble import Pair

PROMPTS = [[5, 6, 7], [9] * 12, [11, 3], [4] * 30, [8, 8, 9, 10, 11], [12] * 7, [3], [20, 21] * 5]


def test_buckets_are_powers_of_two_up_to_the_slot_count():
    assert power_buckets(16) == (1, 2, 4, 8, 16)
    assert power_buckets(12) == (1, 2, 4, 8, 12)
    assert EngineSpec(max_slots=6).buckets == (1, 2, 4, 6)
    assert EngineSpec(max_slots=6, buckets=(6, 3)).buckets == (3, 6)
    with pytest.raises(ValueError, match="largest max_slots"):
        EngineSpec(max_slots=6, buckets=(1, 4))


def test_greedy_rows_are_the_same_in_every_bucket(trio):
    """Eight rows of different lengths and budgets decoded together (their live count falls
    from 8 through every bucket, rows packed down as others finish) and each alone (bucket
    1): the same tokens, and the reference decoder's."""
    base, rl, ref, tok = trio
    eng = RAST(base, [Pair(rl, ref, 0.8)], tokenizer=tok, batch_size=8, workers=1, max_len=128, steps_per_call=4)
    budgets = [30, 6, 18, 3, 25, 9, 12, 40]
    together = [eng.generate([p], SamplingParams(temperature=0, max_new_tokens=n, stop_token_ids=()),
                             progress=False)[0][0].token_ids for p, n in zip(PROMPTS, budgets)]
    sched = eng.scheduler
    from jaxrast.rast.requests import Request, RequestParams

    moves = sched.stats.moves
    requests = [Request(p, RequestParams(max_tokens=n, temperature=0, lam=(0.8,), row_id=i), tag=i)
                for i, (p, n) in enumerate(zip(PROMPTS, budgets))]
    done = {r.tag: r.token_ids for batch in sched.run(requests) for r in batch}
    assert sched.stats.moves > moves  # rows were packed into lower slots as others finished
    for i, (p, n) in enumerate(zip(PROMPTS, budgets)):
        assert done[i] == together[i]
        want, z = reference_decode([base, rl, ref], [0.8], p, vocab=len(tok), max_new_tokens=n, stop_ids=())
        assert_same_up_to_ties(done[i], want, z)


def test_slots_come_from_the_kv_memory(trio, caplog):
    """64 prompts run as 64 rows when the memory holds them (the CPU ceiling), and as many
    as it holds, saying so, when it does not."""
    base, _, _, tok = trio
    per_slot = slot_bytes([base], 64)
    roomy = RAST(base, tokenizer=tok, max_len=64, kv_memory=100 * per_slot / 2**30)
    assert (roomy.batch_size, roomy.capacity.reason) == (64, "ceiling")
    prompts = [[3 + i % 40, 5] for i in range(64)]
    params = SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=())
    out = roomy.generate(prompts, params, progress=False)
    assert roomy.scheduler.stats.peak_rows == 64
    with caplog.at_level(logging.INFO, logger="jaxrast.rast.decoding"):
        tight = RAST(base, tokenizer=tok, max_len=64, kv_memory=20.5 * per_slot / 2**30)
        assert (tight.batch_size, tight.capacity.reason) == (20, "memory")
        assert tight.generate(prompts, params, progress=False) == out
    assert tight.scheduler.stats.peak_rows == 20
    assert any("20 rows in flight (all the KV memory holds" in r.getMessage() for r in caplog.records)
    assert RAST(base, tokenizer=tok, max_len=64, batch_size=5).capacity.reason == "explicit"


def test_kv_memory_settings():
    assert kv_memory_bytes(2, devices=4) == 8 * 2**30
    assert kv_memory_bytes("1.5") == int(1.5 * 2**30)
    assert kv_memory_bytes("50%", free=1000) == 500
    for bad in ("0", "-1", "150%", "lots", 0):
        with pytest.raises(ValueError, match="kv_memory"):
            kv_memory_bytes(bad)


def test_too_little_memory_for_one_slot_is_refused(trio):
    base = trio[0]
    with pytest.raises(ValueError, match="holds no slot of 64 positions"):
        plan_slots([base], 64, kv_memory=1e-9)
    assert np.isfinite(slot_bytes([base], 64))


def test_a_known_workload_takes_no_more_slots_than_its_rows(trio):
    base = trio[0]
    cap = plan_slots([base], 64, kv_memory=1.0, needed=10)
    assert (cap.slots, cap.reason) == (10, "work") and "every row of the work" in cap.describe()
    assert plan_slots([base], 64, kv_memory=1.0, needed=10, multiple=4).slots == 12  # a mesh's row split
    assert plan_slots([base], 64, kv_memory=1.0, needed=1000).reason == "ceiling"


def test_a_smaller_bucket_compiles_only_once_calls_keep_needing_it():
    """A run's last rows finish in a compiled bucket instead of compiling one per halving; a
    bucket is compiled when nothing compiled holds the rows, or after COMPILE_AFTER calls."""
    import types

    from jaxrast.rast.engine import COMPILE_AFTER, Engine
    from jaxrast.rast.token_rules import Record

    spec = EngineSpec(max_slots=16)
    fake = types.SimpleNamespace(buckets=spec.buckets, compiled=set(), spec=spec,
                                 bucket=lambda rows: spec.buckets[np.searchsorted(spec.buckets, rows)])
    run_at = lambda rows, waited=0: Engine.run_at(fake, rows, False, Record(), waited)  # noqa: E731
    assert run_at(3) == 4  # nothing compiled: the exact bucket
    fake.compiled |= {(16, 0, Record()), (1, 0, Record())}
    assert run_at(3) == 16 and run_at(1) == 1
    assert run_at(3, waited=COMPILE_AFTER) == 4
    assert Engine.run_at(fake, 3, False, Record(logprobs=True), 0) == 4  # another program: nothing compiled


def test_buckets_can_be_turned_off_for_bit_identical_reruns(trio):
    base, _, _, tok = trio
    eng = RAST(base, tokenizer=tok, batch_size=4, workers=1, max_len=64, buckets=False)
    assert eng.spec.buckets == (4,) and eng.scheduler.groups[0].engine.bucket(1) == 4
