"""Training and scoring of the testbed checkpoints (``python -m eval.testbed.train``, ``python -m
eval.testbed.evaluate``); the generator, the testbed VLM definition and the held-out export they build on are in
:mod:`vtprune.testbed`."""
