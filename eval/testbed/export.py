"""``python -m eval.testbed.export``: the held-out set export now lives in :mod:`vtprune.testbed.export`."""

from vtprune.testbed.export import main

if __name__ == "__main__":
    main()
