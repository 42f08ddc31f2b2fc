"""`scripts/bench`: the disk data path against its peers, over NBD, in one run.

``servers`` lists what is measured (one entry per table row), ``measure`` starts a server and
times nbdcopy against it, ``report`` prints the table and writes JSON, ``cli`` ties them up.
"""
