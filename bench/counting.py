"""Runs a Python program as its own command line would, then prints the compiles jax made in it.

  python bench/counting.py PROGRAM.py [ARGS...]     # from the repo root

At exit (whatever the status) one line goes to stderr: `compiles N M H`, N the compile requests (XLA
compiles and persistent compilation cache hits alike), M the cache's misses (programs XLA really
compiled with the cache on), H its hits. bench_start.py and tests/test_compilation_cache.py read it.
"""

import atexit
import collections
import runpy
import sys

from jax import monitoring

seen = collections.Counter()
monitoring.register_event_listener(lambda event, **_: seen.update([event]))
monitoring.register_event_duration_secs_listener(lambda event, _, **__: seen.update([event]))
atexit.register(lambda: print("compiles", seen["/jax/core/compile/backend_compile_duration"],
                              seen["/jax/compilation_cache/cache_misses"], seen["/jax/compilation_cache/cache_hits"],
                              file=sys.stderr, flush=True))
sys.argv = sys.argv[1:]
sys.path.insert(0, ".")  # the program's own imports (cli.py) from the repo root
runpy.run_path(sys.argv[0], run_name="__main__")
