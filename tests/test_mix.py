import numpy as np
import pytest

from llmkit.config import ConfigError, load_config
from llmkit.data.mix import DomainTarget, MixConfig, domain_shares, order_key, plan_mix, select


def mix(**kw) -> MixConfig:
    cfg = MixConfig(enabled=True, **kw)
    cfg.validate()
    return cfg


def test_cap_water_fills_the_rest():
    available = {"encyclopedia": 600.0, "web": 300.0, "code": 100.0}
    shares = domain_shares(available, mix(domains={"encyclopedia": DomainTarget(max_ratio=0.4)}))
    assert shares["encyclopedia"] == pytest.approx(0.4)
    # the other 60% split 3:1 by availability
    assert shares["web"] == pytest.approx(0.45) and shares["code"] == pytest.approx(0.15)
    want = plan_mix(available, mix(domains={"encyclopedia": DomainTarget(max_ratio=0.4)}))
    total = sum(want.values())
    assert want["encyclopedia"] / total == pytest.approx(0.4)
    assert all(want[d] <= available[d] + 1e-9 for d in available)
    assert want["web"] == pytest.approx(300.0)  # the binding domain gives all it has


def test_fixed_ratios_and_target():
    available = {"a": 1000.0, "b": 1000.0, "c": 1000.0}
    want = plan_mix(available, mix(target=500, domains={"a": DomainTarget(ratio=0.6)}))
    assert want == pytest.approx({"a": 300.0, "b": 100.0, "c": 100.0})


def _docs(n_per_domain: dict[str, int], seed=0):
    rng = np.random.default_rng(seed)
    domains, sources, sizes, ids = [], [], [], []
    for d, n in n_per_domain.items():
        for i in range(n):
            domains.append(d)
            sources.append(f"{d}-src{i % 2}")
            sizes.append(float(rng.integers(50, 150)))
            ids.append(f"{d}:{i}")
    keys = np.array([order_key(7, i) for i in ids], dtype=np.uint64)
    return np.array(domains), np.array(sources), np.array(sizes), keys, ids


def test_select_hits_requested_ratios_and_is_stratified():
    domains, sources, sizes, keys, _ = _docs({"encyclopedia": 800, "web": 300, "literature": 200})
    cfg = mix(domains={"encyclopedia": DomainTarget(max_ratio=0.4)})
    copies, report = select(domains, sources, sizes, keys, cfg)
    assert report["achieved_share"]["encyclopedia"] == pytest.approx(0.4, abs=0.01)
    assert copies.max() == 1
    # within encyclopedia both sources contribute in proportion to their size
    ency = domains == "encyclopedia"
    for s in ("encyclopedia-src0", "encyclopedia-src1"):
        m = ency & (sources == s)
        frac = (sizes * copies)[m].sum() / sizes[m].sum()
        assert frac == pytest.approx((sizes * copies)[ency].sum() / sizes[ency].sum(), abs=0.03)
    # the choice is by stable per-id keys: a reordered input selects the same documents
    perm = np.random.default_rng(1).permutation(len(domains))
    copies2, _ = select(domains[perm], sources[perm], sizes[perm], keys[perm], cfg)
    assert np.array_equal(copies2, copies[perm])


def test_upsample_repeats_a_small_domain():
    domains, sources, sizes, keys, _ = _docs({"big": 500, "small": 20})
    cfg = mix(target=20_000, domains={"small": DomainTarget(ratio=0.5)}, upsample=True)
    copies, report = select(domains, sources, sizes, keys, cfg)
    assert copies[domains == "small"].min() >= 3  # ~10000 asked of ~2000 available: whole epochs
    assert report["achieved_share"]["small"] == pytest.approx(0.5, abs=0.02)
    assert report["total"] == pytest.approx(20_000, rel=0.02)
    no_up = mix(target=20_000, domains={"small": DomainTarget(ratio=0.5)})
    copies, report = select(domains, sources, sizes, keys, no_up)
    assert copies.max() == 1 and report["achieved_share"]["small"] < 0.5  # falls short, and says so


def test_order_key_is_stable():
    assert order_key(0, "doc-1") == order_key(0, "doc-1") != order_key(1, "doc-1")
    spread = np.array([order_key(0, f"doc-{i}") for i in range(2000)], dtype=np.float64) / 2.0**64
    assert abs(spread.mean() - 0.5) < 0.03  # ranks are spread evenly, so sampling is unbiased


def test_invalid_mix_config(tmp_path):
    cfg = tmp_path / "mix.yaml"
    cfg.write_text("enabled: true\ndomains:\n  a: {ratio: 0.7}\n  b: {ratio: 0.5}\n")
    with pytest.raises(ConfigError, match="sum to 1.200"):
        load_config(MixConfig, cfg)
    cfg.write_text("enabled: true\ndomains:\n  a: {ratio: 0.5, max_ratio: 0.3}\n")
    with pytest.raises(ConfigError, match="domains.a"):
        load_config(MixConfig, cfg)
    cfg.write_text("enabled: true\ndomains:\n  a: {ration: 0.5}\n")
    with pytest.raises(ConfigError, match="ration"):
        load_config(MixConfig, cfg)
