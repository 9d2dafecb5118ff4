"""Development tools, never imported by the service: the fake SGLang worker and the local stack.

``fakeworker`` stands in for a GPU-backed SGLang server (a simulated bounded prefix cache);
``stack`` runs the whole request path as local processes for ``make run``, the integration tests and
the benchmarks.
"""
