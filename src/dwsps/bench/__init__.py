"""``dwsps bench``, the benchmark client: load scenarios against a running server.

- :mod:`dwsps.bench.command`: the command line, the table and the JSON file;
- :mod:`dwsps.bench.scenarios`: fanout, peered, latency and connections;
- :mod:`dwsps.bench.client`: lean connections that account for every delivery;
- :mod:`dwsps.bench.procfs`: server CPU and memory from ``/proc``.
"""
