"""`make bench`: every benchmark in turn; each writes its JSON to bench/results/."""

from . import eval as routing_eval
from . import inflight, payload, tree

for bench in (payload, tree, inflight, routing_eval):
    print(f"== {bench.__name__}", flush=True)
    bench.main([]) if bench in (tree, routing_eval) else bench.main()
