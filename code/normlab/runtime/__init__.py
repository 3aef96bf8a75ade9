"""The notebook runtime: what every lab uses around the BN library.

``data`` (datasets as train/test ``Split``s), ``train`` (one network's training loop and
accuracy), ``ensemble`` (many small networks trained as one, for claims over seeds),
``diagnostics`` (per-layer activations, gradients and update ratios, recorded through hooks),
``plotting`` (the course's figure style and palette), ``bench`` (timing that holds on a busy
machine), ``evidence`` (paired comparisons with intervals), ``claims`` (the registry of the
course's claims), ``glue`` (values the pages show) and ``gpu_bench`` (Chapter 8's recorded GPU
benchmarks, in ``results/``).

The runtime imports the BN library (``normlab.nn``, ``normlab.stats``, ...), never the chapters
(``normlab.experiments``, ``normlab.checks``), and the library never imports the runtime
(``tests/test_layers.py``). ``normlab.setup()``, the first cell's call, lives in the package
itself, the runtime's entry point.
"""
