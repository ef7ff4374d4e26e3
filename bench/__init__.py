"""``make bench``: the provider's throughput, latency and memory against same-run baselines.

The machine is small and shared, so absolute figures drift from run to run. What is reported is
the ratio of the provider's throughput to that of a trivial Flask app (``bench.baseline_app``)
that does only the work each endpoint inherently needs (form parsing, one HMAC, the ES256
signatures and verifications), served by the same gunicorn settings and measured in the same
run, interleaved with the provider's runs so that noise hits both alike. The other groups
compare two setups the same way: the gateway against a direct call, DPoP against bearer, several
instances on PostgreSQL and Redis against one, audit and rate limits on against off.

Modules: :mod:`bench.wrk` (the load generator), :mod:`bench.servers` (processes, CPU, RSS),
:mod:`bench.fixtures` (provider instances with clients and tokens, and the requests sent),
:mod:`bench.dpop` (DPoP proofs made beforehand), :mod:`bench.baseline_app`,
:mod:`bench.upstream_app` (the gateway's upstream), :mod:`bench.groups` (what each group
starts and measures), :mod:`bench.noise` (how busy the rest of the machine was),
:mod:`bench.report` (targets, report, ``bench/results/latest.json``), :mod:`bench.__main__`.
"""
