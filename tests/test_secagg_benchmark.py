"""benchmarks/secagg_round.py: the bytes per site per stage follow from the message sizes."""

from __future__ import annotations

from benchmarks.secagg_round import measure
from common.secagg.messages import SEALED_BYTES


def test_bytes_per_site_per_stage_for_four_sites() -> None:
    costs = measure(sites=4, coordinates=100, dropped=1)
    ids, signed = 8, 136 + 96  # a P-384 identity (OpenSSH encoding) and its r || s signature
    assert costs["1-keys"].site_upload_bytes == ids + 2 * 32 + signed
    assert costs["2-shares"].site_download_bytes == 4 * (ids + 2 * 32 + signed)
    assert costs["2-shares"].site_upload_bytes == ids + 3 * (ids + SEALED_BYTES)
    assert costs["3-masked"].site_upload_bytes == ids + 8 * (100 + 1 + 1)  # indicator, weight
    assert costs["4-reveal"].site_download_bytes == ids * 4  # 1 dropped, 3 survivors
    assert costs["4-reveal"].site_upload_bytes == ids + 4 * (ids + 32)
    assert all(c.seconds > 0 for c in costs.values())
    assert costs["1-keys"].identity_seconds > 0 and costs["2-shares"].identity_seconds > 0
