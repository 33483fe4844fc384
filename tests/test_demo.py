"""The README's demo command runs the chain end to end and reports its artifacts."""

import stat

from keyshard.pipeline.manifest import load, verify

from conftest import assert_user_error, invoke


def test_demo_chain(tmp_path):
    work = tmp_path / "demo"
    res = invoke("demo", "--workdir", work, "--images", 16, "--size", 32, "--jobs", 1)
    assert res.exit_code == 0, res.output
    assert "decrypts exactly" in res.output
    assert stat.S_IMODE((work / "key.json").stat().st_mode) == 0o600
    enc = load(work / "shards-enc")
    assert enc["encryption"]["method"] == "ffx" and enc["augmentation"]["copies"] == 1
    assert load(work / "shards-plain")["encryption"]["plain"]
    assert verify(work / "shards-enc", progress=False) == []
    assert_user_error(invoke("demo", "--workdir", work), "not empty")
