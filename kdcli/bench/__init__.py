"""Benchmarks that kdcli runs itself: ``kdcli bench quality`` (:mod:`.quality`: every method at one equal
budget, over seeds, ranked) and ``kdcli bench speed`` (:mod:`.speed`: one training step per method against
the floor of teacher inference + a plain student step)."""
