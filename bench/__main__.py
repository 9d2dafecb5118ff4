"""`make bench`: every benchmark in turn; each writes its JSON to bench/results/.

Single ones: python -m bench.payload | bench.codec | bench.tree | bench.inflight | bench.sweep | bench.eval | bench.observed | bench.e2e | bench.e2e_rivals | bench.e2e_ab | bench.overhead | bench.cpu | bench.attacks |
bench.replicas | bench.replicas_e2e | bench.sync |
bench.litellm (needs `make litellm`)
"""

from . import attacks, codec, cpu, e2e, e2e_ab, e2e_rivals, inflight, litellm, observed, overhead, payload, replicas, replicas_e2e, sweep, sync, tree
from . import eval as routing_eval

for name, run in (
    ("payload", payload.main),
    ("codec", codec.main),
    ("tree", lambda: tree.main([])),
    ("inflight", inflight.main),
    ("sweep", lambda: sweep.main([])),  # chooses the cost rule's defaults on the tuning set; eval then reports both sets
    # the same grid where the defaults were not chosen: does the choice carry over?
    *((f"sweep {t}", lambda t=t: sweep.main(["--topology", t])) for t in routing_eval.OTHER_TOPOLOGIES),
    ("eval", lambda: routing_eval.main([])),
    *((f"eval {t}", lambda t=t: routing_eval.main(["--topology", t])) for t in (*routing_eval.OTHER_TOPOLOGIES, *routing_eval.UNSEEN_TOPOLOGIES)),
    *((f"eval {t} threshold {x:g}", lambda t=t, x=x: routing_eval.main(["--topology", t, "--router-cache-threshold", str(x)]))
      for t, x in routing_eval.ROUTER_THRESHOLDS),
    *((f"eval {t} batch {b} {' '.join(more)}", lambda t=t, b=b, more=more: routing_eval.main(["--topology", t, "--batch", str(b), *more]))
      for t, b, more in routing_eval.BATCHES),
    *((f"eval {t} seeds {routing_eval.FRESH_SEEDS}", lambda t=t: routing_eval.main(["--topology", t, "--seeds", routing_eval.FRESH_SEEDS]))
      for t in ("4x2", *routing_eval.OTHER_TOPOLOGIES)),
    ("observed", observed.main),
    ("e2e", lambda: e2e.main([])),
    ("e2e 3x3", lambda: e2e.main(["--topology", "3x3", "--clients", "12"])),  # the independent evaluation's shape
    ("e2e 4x2", lambda: e2e.main(["--topology", "4x2", "--clients", "24"])),  # the independent evaluation's second shape
    ("e2e 2x4", lambda: e2e.main(["--topology", "2x4", "--clients", "16"])),  # the simulator's weakest shape, no default chosen on it
    # the same with workers that run one prefill at a time, as a GPU does: load costs latency there
    ("e2e 3x3 serial prefill", lambda: e2e.main(["--topology", "3x3", "--clients", "12", "--serial-prefill"])),
    # ... and with workers that run 4 requests at once, the rest waiting for a slot
    ("e2e 3x3 batch 4", lambda: e2e.main(["--topology", "3x3", "--clients", "12", "--batch", "4"])),
    ("e2e 3x3 threshold 0.7", lambda: e2e.main(["--topology", "3x3", "--clients", "12", "--router-cache-threshold", "0.7"])),
    ("e2e_rivals", lambda: e2e_rivals.main(["--topology", "2x2", "--clients", "8,16"])),  # after e2e: reads what it measured
    ("e2e_rivals 3x3", lambda: e2e_rivals.main(["--topology", "3x3", "--clients", "12"])),
    ("e2e_rivals 4x2", lambda: e2e_rivals.main(["--topology", "4x2", "--clients", "24"])),
    ("e2e_rivals 2x4", lambda: e2e_rivals.main(["--topology", "2x4", "--clients", "16"])),
    # the four set-ups of bench.e2e on a hundred seeds, each rival paired with the default seed by seed
    *((f"e2e_rivals {t} x{c} seeds {e2e_rivals.MANY_SEEDS}", lambda t=t, c=c: e2e_rivals.main(["--topology", t, "--clients", c, "--seeds", e2e_rivals.MANY_SEEDS]))
      for t, c in (("2x2", "8,16"), ("3x3", "12"), ("4x2", "24"), ("2x4", "16"))),
    ("e2e_rivals 3x3 serial prefill", lambda: e2e_rivals.main(["--topology", "3x3", "--clients", "12", "--serial-prefill"])),
    ("e2e_rivals 3x3 batch 4", lambda: e2e_rivals.main(["--topology", "3x3", "--clients", "12", "--batch", "4"])),
    (f"e2e_rivals 3x3 batch 4 seeds {e2e_rivals.MANY_SEEDS}",
     lambda: e2e_rivals.main(["--topology", "3x3", "--clients", "12", "--batch", "4", "--seeds", e2e_rivals.MANY_SEEDS])),
    *((f"e2e_rivals {t} x{c} serial prefill seeds {e2e_rivals.MANY_SEEDS}",
       lambda t=t, c=c: e2e_rivals.main(["--topology", t, "--clients", c, "--serial-prefill", "--seeds", e2e_rivals.MANY_SEEDS]))
      for t, c in (("3x3", "12"), ("4x2", "24"), ("2x4", "16"))),
    *((f"e2e_rivals 3x3 threshold {x}", lambda x=x: e2e_rivals.main(["--topology", "3x3", "--clients", "12", "--router-cache-threshold", x]))
      for x in ("0.5", "0.7")),
    # the default against the last round's rule, run after run, where the real stack's noise hid it
    ("e2e_ab", lambda: e2e_ab.main(["--topology", "3x3", "--clients", "12", "--case", "shared_prefix",
                                    "--against", "--new-prefix-weight 0 --new-prefix-knee 0", "--repeats", "3"])),
    ("overhead", overhead.main),
    ("cpu", lambda: cpu.main([])),
    ("attacks", lambda: attacks.main([])),
    ("replicas", lambda: replicas.main([])),
    ("sync", sync.main),
    ("replicas_e2e", lambda: replicas_e2e.main([])),
    ("litellm", litellm.main),
):
    print(f"== {name}", flush=True)
    run()
