"""mpproxy: a layer-4 TCP and UDP reverse proxy with nginx's master/worker process model.

Packages and what they may import:
  config/   schema and loader              -> errors
  upstream/ server pools and balancers     -> config
  proxy/    the data path (TCP, UDP)       -> config, upstream, observe   (never master/)
  observe/  logging, metrics, admin HTTP   -> config, errors, upstream (pool's histogram buckets)
  worker/   one worker process             -> config, proxy, upstream, observe
  master/   the arbiter                    -> config, worker, observe, errors
  cli.py    the command line; the only place that exits the master process
"""

__version__ = '0.1.0'
