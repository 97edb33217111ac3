from batch_job.pricing import PRICE_TABLE, PRICES_AS_OF, object_cost


def test_table_has_inf2_and_date():
    for t in ("inf2.xlarge", "inf2.8xlarge", "inf2.24xlarge", "inf2.48xlarge"):
        assert PRICE_TABLE[t].usd_per_hour > 0
    assert PRICES_AS_OF


def test_share_of_instance_hour():
    c = object_cost(3600.0, "inf2.24xlarge")
    assert c.usd == round(6.4906 / 12, 8) and c.jobs_per_instance == 12


def test_overrides():
    c = object_cost(1800.0, "whatever", price_override=2.0, jobs_override=4)
    assert c.usd == 0.25


def test_unknown_type_gives_none_with_reason():
    c = object_cost(10.0, "x9.huge")
    assert c.usd is None and "WHISPER_BATCH_INSTANCE_PRICE_PER_HOUR" in c.reason
    assert object_cost(10.0, "").usd is None


def test_cost_block_splits_model_load_across_pack():
    from batch_job.job.objects import cost_block
    from batch_job.settings import Settings
    s = Settings(instance_type="inf2.xlarge")
    b = cost_block(s, 36.0, 20.0, 4)
    assert b["model_load_share_seconds"] == 5.0
    assert b["usd"] == round(36 / 3600 * 0.7582 / 2, 8)
    assert b["total_usd"] == round(b["usd"] + b["model_load_usd"], 8)
    unknown = cost_block(Settings(instance_type=""), 36.0, None, 1, instance_type="")
    assert unknown["total_usd"] is None and unknown["reason"]


def test_cost_block_looks_price_up_once(monkeypatch):
    from batch_job import pricing
    from batch_job.job.objects import cost_block
    from batch_job.settings import Settings
    calls = []
    real = pricing.object_cost
    monkeypatch.setattr(pricing, "object_cost", lambda *a, **k: calls.append(a) or real(*a, **k))
    b = cost_block(Settings(instance_type="inf2.xlarge"), 36.0, 20.0, 4)
    assert len(calls) == 1 and b["total_usd"] == round(41 / 3600 * 0.7582 / 2, 8)


def test_cost_block_empty_setting_uses_imds_reason(monkeypatch):
    from batch_job import pricing
    from batch_job.job.objects import cost_block
    from batch_job.settings import Settings
    monkeypatch.setattr(pricing, "resolve_instance_type", lambda s: ("", "instance type from IMDS unavailable (x)"))
    b = cost_block(Settings(instance_type=""), 36.0, None, 1)
    assert b["total_usd"] is None and "IMDS unavailable" in b["reason"]
