"""Secure aggregation (SecAgg+, Bell et al. 2020) as plain Python: the coordinator learns a sum.

`params` (the round's public parameters and the safe threshold rule), `messages` (what each stage
sends), `site` (a site's state machine and its rules), `identity` (the hospitals' identity keys
that sign the relayed public keys, and the roster), `coordinator` (relay, dropouts, the sum),
`vector` (an update as one ring vector), `quantization`, `masking` (PRG masks), `keys` (key
agreement, encryption), `sharing` (Shamir), `noise` (integer noise for distributed DP). See
docs/SECAGG.md.
"""
