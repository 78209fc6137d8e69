"""`jaxrast plan`'s rows in flight: dense slots against paged KV for a long-tailed workload."""

import json

import numpy as np
import pytest

from jaxrast.cli import main
from jaxrast.plan.concurrency import Workload, concurrency, expected_capped_lognormal, kv_bytes_per_token
from jaxrast.plan.memory import resolve_config


def test_expected_capped_length_equals_sampling():
    rng = np.random.default_rng(0)
    for median, cap in ((512, 4096), (64, 1024), (48, 224), (100, 50)):
        drawn = np.minimum(rng.lognormal(np.log(median), 1.0, 400_000), cap).mean()
        assert expected_capped_lognormal(median, cap) == pytest.approx(drawn, rel=0.01)
    assert expected_capped_lognormal(10, 1e12) == pytest.approx(10 * np.exp(0.5))  # no cap: the mean
    with pytest.raises(ValueError, match="must be > 0"):
        expected_capped_lognormal(0, 10)


def test_kv_bytes_per_token_of_the_papers_models():
    """The issue's own numbers: bf16 KV of Qwen2.5-32B and of a 14B model per token."""
    assert kv_bytes_per_token(resolve_config("Qwen/Qwen2.5-32B"), 2) == 256 * 1024
    assert kv_bytes_per_token(resolve_config("Qwen/Qwen2.5-14B"), 2) == 192 * 1024


def test_dense_slots_reserve_the_budget_and_pages_only_what_rows_fill():
    cfg = resolve_config("Qwen/Qwen2.5-7B")
    per_token = kv_bytes_per_token(cfg, 2)
    budget = 1000 * per_token * 4608 + 123
    work = Workload(prompt_len=512, new_tokens=4096, median_new=512, samples=8, page_size=16)
    c = concurrency([("base", cfg)], work, budget, 2)
    assert c["dense_rows"] == 1000
    expected = 512 + expected_capped_lognormal(512, 4096) + 8  # half a page of rounding
    assert c["paged_rows"] == int(budget // (per_token * expected))
    assert c["dense_rows"] < c["paged_rows"] < c["paged_rows_shared_prompt"]
    one = concurrency([("base", cfg)], Workload(512, 4096, 512, samples=1), budget, 2)
    assert one["paged_rows_shared_prompt"] == one["paged_rows"]


def test_plan_prints_rows_in_flight(capsys):
    args = ["plan", "--base", "Qwen/Qwen2.5-32B", "--pair", "hkust-nlp/Qwen-2.5-14B-SimpleRL-Zoo",
            "Qwen/Qwen2.5-14B", "--mesh", "1,8,1", "--device", "h100", "--new-tokens", "4096", "--samples", "8"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "KV per token: base 256.0 KiB, rl 192.0 KiB, ref 192.0 KiB" in text
    assert "dense slots of 512 + 4096 positions" in text and "n = 8 samples sharing" in text
    assert main([*args, "--json"]) == 0
    c = json.loads(capsys.readouterr().out)["concurrency"]
    assert 100 < c["dense_rows"] < c["paged_rows"] < c["paged_rows_shared_prompt"]
