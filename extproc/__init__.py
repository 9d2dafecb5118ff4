"""prefix-router: an Envoy ext_proc service for prefix-cache-aware routing across SGLang routers.

Modules, in the direction of their imports:
``handlers`` (ext_proc mechanics) → ``director`` (request lifecycle) → ``policy`` (the decision) →
``tree`` (the radix tree); ``payload`` (routing text), ``pool`` (upstreams and in-flight counts).
``fakeworker`` and ``stack`` are for running and testing the whole path on one machine.
"""

__version__ = "0.1.0"
