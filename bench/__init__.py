"""``make bench``: the provider's throughput, latency and memory against same-run baselines.

The machine is small and shared, so absolute figures drift from run to run. What is reported is
the ratio of the provider's throughput to that of a trivial Flask app (``bench.baseline_app``)
that does only the work each endpoint inherently needs (form parsing, one HMAC, the ES256
signatures and verifications), served by the same gunicorn settings and measured in the same
run, interleaved with the provider's runs so that noise hits both alike.

Modules: :mod:`bench.wrk` (the load generator), :mod:`bench.servers` (processes, CPU, RSS),
:mod:`bench.fixtures` (a provider instance with clients and tokens, and the requests sent),
:mod:`bench.baseline_app`, :mod:`bench.noise` (how busy the rest of the machine was),
:mod:`bench.report` (targets, report, ``bench/results/latest.json``), :mod:`bench.__main__`.
"""
