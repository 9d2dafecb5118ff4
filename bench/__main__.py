"""`make bench`: every benchmark in turn; each writes its JSON to bench/results/.

Single ones: python -m bench.payload | bench.codec | bench.tree | bench.inflight | bench.eval | bench.sweep | bench.e2e | bench.overhead | bench.attacks
"""

from . import attacks, codec, e2e, inflight, overhead, payload, sweep, tree
from . import eval as routing_eval

for name, run in (
    ("payload", payload.main),
    ("codec", codec.main),
    ("tree", lambda: tree.main([])),
    ("inflight", inflight.main),
    ("eval", lambda: routing_eval.main([])),
    ("sweep", sweep.main),
    ("e2e", e2e.main),
    ("overhead", overhead.main),
    ("attacks", lambda: attacks.main([])),
):
    print(f"== {name}", flush=True)
    run()
