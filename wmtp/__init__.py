"""weighted-mtp's rooms, one module per concern (the map: ../shared/DESIGN.md's layout and docs/internals).

They live in this package, not at the top of the checkout, so that a user's `config.py`, `data/`, `model/` or
`weights/` beside a command cannot shadow them; the design card's `weighted_mtp.py` (the trainer and entry point),
`weights.py` (the weighting math) and `s3ckpt.py` (checkpoint storage) stay at the top.
"""
