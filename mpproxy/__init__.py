"""mpproxy: a layer-4 TCP and UDP reverse proxy with nginx's master/worker process model.

Packages (each one's docstring says what it owns and, in a `May import:` line that
tests/unit/test_layout.py checks, which mpproxy packages it may import):
  config/   schema and loader                       -> errors
  upstream/ server pools and balancers              -> config, errors
  shared/   shared-memory blocks (connection limits) -> config
  observe/  logging, metrics, admin HTTP            -> config, errors, upstream
  proxy/    the data path: io/, edge/ (pure), tcp/, udp/ -> config, errors, upstream, shared,
            observe, and io/ + edge/ from tcp/ and udp/ (which never import each other)
  worker/   one worker process                      -> config, errors, proxy, upstream, shared, observe
  master/   the arbiter and its state               -> config, errors, worker, upstream, shared, observe
  cli.py    the command line; the only place that exits the master process
"""

__version__ = '0.1.0'
