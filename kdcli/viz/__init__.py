"""Figures and method internals: ``results.png`` of every run (:mod:`.plots`), ``kdcli viz`` (:mod:`.viz`)
and the mask statistics logged during training (:mod:`.stats`).

Nothing here is imported by ``kdcli --help``; matplotlib is imported only when a figure is drawn, with
the headless Agg backend.
"""
