"""The applications on top of the library: the command line (cli.py, handlers by command group),
the demo, sweeps and their launchers, benchmarks, export, the web demo, class descriptions,
layer analysis and cross-dataset evaluation."""
